"""The service's gateway. A flow's `gateway: {uses: LLMGateway, py_modules: [gateway/__init__.py]}` imports this
file by path, so everything it needs comes through absolute imports of the installed project."""

from gateway.gateway import LLMGateway, LLMHTTPGateway

__all__ = ["LLMGateway", "LLMHTTPGateway"]
