"""langchain-tests standard suites for ChatQLLM: unit (offline, no model load) and integration."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_tests")

from langchain_core.messages import AIMessage, HumanMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from qllm_integrations import ChatQLLM


class TestChatQLLMUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatQLLM]:
        return ChatQLLM

    @property
    def supports_model_override(self) -> bool:
        return False


class TestChatQLLMIntegration(ChatModelIntegrationTests):
    engine = None

    @pytest.fixture(autouse=True, scope="class")
    def _share_engine(self, request: pytest.FixtureRequest, default_engine) -> None:
        request.cls.engine = default_engine

    @property
    def chat_model_class(self) -> type[ChatQLLM]:
        return ChatQLLM

    @property
    def chat_model_params(self) -> dict:
        return {"engine": self.engine, "max_tokens": 24}

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        memory = self.engine.read("The meeting moved to Thursday at noon, in room 4B.")
        model = ChatQLLM(engine=self.engine, memory=memory, max_tokens=8)
        question = [HumanMessage("When is the meeting?")]
        if not stream:
            return model.invoke(question)
        full = None
        for chunk in model.stream(question):
            full = chunk if full is None else full + chunk
        return full

    @pytest.mark.xfail(reason="with tool_choice='auto' the 135M model answers the weather question in prose "
                              "instead of calling get_weather (forced calls work: see test_tool_calling)")
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model: ChatQLLM) -> None:
        super().test_agent_loop(model)

    @pytest.mark.xfail(reason="the 135M model does not copy the Chinese/Japanese company name into the "
                              "customer_name argument; it writes English text instead")
    def test_unicode_tool_call_integration(self, model: ChatQLLM, **kwargs) -> None:
        super().test_unicode_tool_call_integration(model, **kwargs)
