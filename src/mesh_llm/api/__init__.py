"""The router's HTTP side: an OpenAI-compatible API, the /console page and Prometheus /metrics."""

from mesh_llm.api.server import ApiConfig, RunningApi, client_settings, start_api

__all__ = ["ApiConfig", "RunningApi", "client_settings", "start_api"]
