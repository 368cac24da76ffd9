"""An LCEL chain that answers from a document longer than the model's 8K-token window.

The document sits in the system message (context, read into block memory); the human message is the
question that picks which blocks each layer looks up. Then the same document is read once and asked
several questions, each encoding only the question and its answer.

Run: python examples/langchain_long_document.py   (embedded SmolLM2-135M-Instruct, CPU is fine)
"""

from __future__ import annotations

import itertools
import time

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from qllm_integrations import ChatQLLM

FACTS = {40: "The secret launch code of the red rocket is 58291.", 380: "The blue rover is parked in hangar 7."}
QUESTIONS = ["What is the secret launch code of the red rocket?", "Where is the blue rover parked?"]


def station_log(n_entries: int) -> str:
    """A monotonous station log with a few memorable entries."""
    weather = itertools.cycle(["calm", "windy", "rainy", "foggy", "clear"])
    work = itertools.cycle(["checked the fuel lines", "painted the hangar", "tested the radio",
                            "cleaned the launch pad", "counted the spare parts"])
    entries = [f"Day {day}: The weather was {next(weather)}. The crew {next(work)} and went to bed early."
               for day in range(1, n_entries + 1)]
    for position, fact in sorted(FACTS.items(), reverse=True):
        entries.insert(position, fact)
    return "\n".join(entries)


def main() -> None:
    chat = ChatQLLM(max_tokens=24)  # loads the embedded model on first use
    document = station_log(n_entries=450)
    print(f"document: {chat.load_engine().count_tokens(document)} tokens (the model was trained on 8K)")

    prompt = ChatPromptTemplate.from_messages([("system", "Answer from this station log.\n\n{document}"),
                                               ("human", "{question}")])
    chain = prompt | chat | StrOutputParser()
    start = time.perf_counter()
    print(f"Q: {QUESTIONS[0]}\nA: {chain.invoke({'document': document, 'question': QUESTIONS[0]})}"
          f"  ({time.perf_counter() - start:.0f} s, document read with the question's lookups)")

    memory = chat.load_engine().read(document)  # read once ...
    reader = chat.bind(memory=memory)  # ... ask many
    for question in QUESTIONS:
        start = time.perf_counter()
        answer = reader.invoke(question)
        print(f"Q: {question}\nA: {answer.text}  ({time.perf_counter() - start:.1f} s, "
              f"{answer.usage_metadata['input_token_details']['cache_read']} tokens from memory)")


if __name__ == "__main__":
    main()
