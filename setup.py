"""Build hook: generate the gRPC Python modules from proto/ before packaging."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "src"


def generate_protos() -> None:
    """Run grpc_tools.protoc over proto/mesh_llm/v1/*.proto into src/mesh_llm/pb/."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "mesh_llm" / "v1").glob("*.proto"))
    out = OUT_ROOT / "mesh_llm" / "pb"
    out.mkdir(parents=True, exist_ok=True)
    # protoc writes mesh_llm/v1/x_pb2.py under the output root; generate into a staging root and move
    stage = ROOT / "build" / "proto_stage"
    stage.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={stage}", f"--pyi_out={stage}",
            f"--grpc_python_out={stage}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(sources))
    for generated in (stage / "mesh_llm" / "v1").iterdir():
        text = generated.read_text()
        # generated modules import each other as mesh_llm.v1.*; they live in mesh_llm.pb
        text = text.replace("from mesh_llm.v1 import", "from mesh_llm.pb import")
        (out / generated.name).write_text(text)
    (out / "__init__.py").write_text('"""Generated protobuf and gRPC modules (not committed)."""\n')


class BuildPyWithProtos(build_py):
    """build_py that generates protobuf code first."""

    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
