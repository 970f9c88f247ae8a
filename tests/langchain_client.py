"""LangChain against the service, unchanged: run by tests/test_langchain.py in .venv-clients (LangChain 1.x needs
pydantic 2, the service's venv has jina's pydantic 1), so it imports nothing of the project's. Prints one JSON
object: what each LangChain way of asking for structure or tools gave back.

    .venv-clients/bin/python tests/langchain_client.py http://127.0.0.1:8080/v1 test-model
"""

from __future__ import annotations

import json
import sys

from langchain_core.messages import AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(max_length=40)
    country: str = Field(max_length=40)


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def main(base_url: str, model: str) -> None:
    llm = ChatOpenAI(base_url=base_url, api_key="not-needed", model=model, max_tokens=60, temperature=0,
                     max_retries=0)
    results: dict = {}
    # json_mode is left out: it asks for any JSON object, which the City schema does not constrain.
    for method in ("json_schema", "function_calling"):
        answer = llm.with_structured_output(City, method=method).invoke("Tell me about Tokyo.")
        results[method] = {"type": type(answer).__name__, **answer.model_dump()}

    bound = llm.bind_tools([get_weather], tool_choice="required")
    question = HumanMessage("What's the weather in Paris?")
    called = bound.invoke([question])
    results["bind_tools"] = called.tool_calls
    streamed: AIMessageChunk | None = None
    for chunk in bound.stream([question]):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed is not None
    results["bind_tools_streamed"] = streamed.tool_calls
    # The agent loop's next turn: the call and its result in the history.
    call = called.tool_calls[0]
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    followed = llm.bind_tools([get_weather]).invoke([question, called, result])
    results["after_tool_result"] = {"content": followed.content, "tool_calls": followed.tool_calls}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
