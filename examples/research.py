"""Research assistant: an agent that searches a corpus through a tool and summarises.

    make research          # or: tidings run examples.research:app

`agent.task.started` (a question) -> the `researcher` agent reports progress, calls the
`corpus.search` tool over the bus (`tool.invoke.corpus.search` -> `tool.result...`),
asks the model to summarise what it found, and emits `agent.task.completed` with the
answer, or `agent.task.failed`. When the corpus has nothing on a question, it asks a human
(`tidings approvals ls`) whether to answer from the model alone. The `reporter` prints
progress and answers. Every step is journaled: kill the worker mid-flight and restart it,
and no search or model call is paid twice.

Both agents start at the events published after they were first deployed (`start="new"`),
not at whatever an earlier experiment left on the bus, and a task without a question is
dead-lettered at once with the reason (`tidings dlq ls`), not retried.

The model is scripted (no network needed). Set RESEARCH_MODEL=gpt-4o-mini (with
OPENAI_API_KEY, and OPENAI_BASE_URL for a local server such as Ollama) to use a real one.
Ask your own question from a second terminal:

    tidings publish agent.task.started '{"question": "Why are there two tides a day?"}'
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tidings import App, Client, Context, Event
from tidings.errors import ApprovalTimeout, ToolError
from tidings.llm import FakeModel, Request

app = App("research")
CORPUS = Path(__file__).with_name("research_corpus")
QUESTIONS = [
    "What causes tides, and when are they strongest?",
    "How do estuaries change with the tide?",
    "What drives ocean currents?",
]


def _load_corpus() -> dict[str, str]:
    return {path.stem: path.read_text() for path in sorted(CORPUS.glob("*.md"))}


DOCUMENTS = _load_corpus()
_WORD = re.compile(r"[a-z]+")
_COMMON = {"what", "when", "which", "they", "does", "with", "that", "this", "from", "there",
           "their", "have", "about", "into", "change"}  # fmt: skip


@app.tool("corpus.search")
async def search(query: str, limit: int = 2) -> list[dict[str, Any]]:
    """Find the corpus documents that share the most words with the query."""
    wanted = {w for w in _WORD.findall(query.lower()) if len(w) > 3 and w not in _COMMON}
    scored: list[dict[str, Any]] = []
    for name, text in DOCUMENTS.items():
        words = _WORD.findall(text.lower())
        score = sum(words.count(w) for w in wanted)
        if score:
            title, _, body = text.partition("\n")
            scored.append({"doc": name, "title": title.lstrip("# "), "text": " ".join(body.split()),
                           "score": score})  # fmt: skip
    scored.sort(key=lambda hit: (-hit["score"], hit["doc"]))
    return scored[:limit]


def scripted_summary(request: Request) -> str:
    """The scripted model: the first sentence of each source, with its title."""
    prompt = str(request.messages[-1]["content"])
    sources = re.findall(r"^\[(.+?)\] (.+?\.)", prompt, flags=re.MULTILINE)
    if not sources:
        return "The corpus has nothing on that; a real model would answer from what it knows."
    return " ".join(f"{text} ({title})" for title, text in sources)


if os.environ.get("RESEARCH_MODEL"):
    from tidings.llm import OpenAIChat

    base = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
    app.llm.add(OpenAIChat(os.environ["RESEARCH_MODEL"], base_url=base))
else:
    app.llm.add(FakeModel(scripted_summary, name="scripted"))


class Task(BaseModel):
    """What `agent.task.started` must carry: a question."""

    question: str = Field(min_length=1)


@app.agent(
    "researcher",
    on="agent.task.started",
    emits=["agent.task.completed", "agent.task.failed"],
    max_attempts=3,
    data_model=Task,  # a task without a question is dead-lettered at once, with the reason
    start="new",  # a first run does not answer every task left on the bus before it
)
async def research(event: Event, ctx: Context) -> dict[str, Any]:
    """Searches the corpus for the question and summarises the best sources."""
    question = event.data.question
    await ctx.progress(0.1, "searching the corpus")
    try:
        hits = await ctx.tool("corpus.search", {"query": question, "limit": 2}, timeout=30)
    except ToolError as e:
        return await _failed(ctx, question, str(e))
    if not hits:
        await ctx.progress(0.3, "nothing in the corpus; asking whether to answer anyway")
        try:
            go_on = await ctx.ask(
                {"question": question, "ask": "The corpus has nothing on this. Answer from the"
                 " model alone? (true/false)"},
                timeout=3600,
            )  # fmt: skip
        except ApprovalTimeout:
            go_on = False
        if go_on is not True:
            return await _failed(ctx, question, "nothing in the corpus, and no go-ahead")
    found = f"{len(hits)} source{'' if len(hits) == 1 else 's'}"
    await ctx.progress(0.5, f"found {found}; summarising")
    sources = "\n".join(f"[{hit['title']}] {hit['text']}" for hit in hits)
    answer = await ctx.llm.complete(
        [
            {"role": "system", "content": "Answer from the sources only; cite titles."},
            {"role": "user", "content": f"Question: {question}\nSources:\n{sources}"},
        ],
        max_tokens=300,
    )
    result = {
        "question": question,
        "answer": answer.text,
        "sources": [hit["doc"] for hit in hits],
    }
    await ctx.progress(1.0, "done")
    await ctx.emit("agent.task.completed", result)
    return result


async def _failed(ctx: Context, question: str, error: str) -> dict[str, Any]:
    await ctx.emit("agent.task.failed", {"question": question, "error": error})
    return {"failed": error}


@app.agent("reporter", on=["agent.task.progress", "agent.task.completed", "agent.task.failed"],
           emits=[], start="new")  # fmt: skip
async def report(event: Event, ctx: Context) -> None:
    """Prints what a user interface would show."""
    data = event.data
    if event.type == "agent.task.progress":
        print(f"[{event.correlationid}] {data['fraction']:>4.0%} {data['message']}")
    elif event.type == "agent.task.completed":
        print(f"[{event.correlationid}] Q: {data['question']}\n  A: {data['answer']}")
    else:
        print(f"[{event.correlationid}] FAILED: {data['error']}")


@app.on_startup
async def ask_sample_questions(client: Client) -> None:
    """Publishes the sample questions once (fixed ids: a restart does not ask again)."""
    if os.environ.get("RESEARCH_SAMPLES", "1") == "0":
        return
    for n, question in enumerate(QUESTIONS, start=1):
        await client.publish("agent.task.started", {"question": question}, id=f"sample-{n}")
