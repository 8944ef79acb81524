"""Self-prompting agent: observe, ask the mesh, propose, gate, apply, measure."""
