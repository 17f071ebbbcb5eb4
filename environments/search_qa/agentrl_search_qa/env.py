"""`search-qa-v0`: two-hop questions over a bundled collection, with `search` and `fetch` tools.

A question asks for a fact of the town where a (fictional) person was born. The model searches
the collection (`search`, BM25 from `bm25s`: ids, titles and the first sentence of the best
documents), reads whole documents (`fetch`, through agentrl's SSRF-safe HTTP client from a document
server the env runs on 127.0.0.1), and answers. Reward 1 when the answer names the right river,
province or year and no other one, else 0.

Splits are by person: a person belongs to `test` iff a hash of their name falls in one bucket of
five, so a test question is never about anyone a training question mentions.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from urllib.parse import quote

from agentrl.envs import Task, ToolEnv
from agentrl.tools.builtin.http_fetch import format_response
from agentrl.tools.core import ToolPolicy, env_tool, tool
from agentrl.tools.http import FetchPolicy, fetch
from agentrl_search_qa import server
from agentrl_search_qa.corpus import PROVINCES, RIVERS, build

TEST_BUCKETS = 5
SYSTEM_PROMPT = "Search the documents, fetch the ones you need, then answer in a few words."
_LOCAL_ONLY = FetchPolicy(deadline_s=5.0, max_bytes=64 * 1024, max_redirects=0, allow_networks=("127.0.0.1/32",))


def _is_test(person: str) -> bool:
    return int.from_bytes(hashlib.sha256(person.encode()).digest()[:4], "little") % TEST_BUCKETS == 0


def _questions(split: str) -> list:
    return [q for q in build()[1] if _is_test(q.person) == (split == "test")]


@tool(policy=ToolPolicy(timeout_s=5.0, max_output_chars=1000))
def search(query: str) -> str:
    """Search the document collection; returns the ids, titles and first sentences of the best matches.

    Args:
        query: Words to look for, e.g. a name.
    """
    hits = server.search(query)
    if not hits:
        return "no documents match"
    return "\n".join(f"[{d.id}] {d.title}: {d.text.split('. ')[0]}." for d in hits)


def _call(name: str, **arguments: str) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


class SearchQAEnv(ToolEnv):
    """Two-hop questions answered with `search` and `fetch`."""

    splits = ("train", "test")

    def __init__(self, max_calls_per_turn: int = 3, system_prompt: str | None = SYSTEM_PROMPT):
        self.server = server.acquire()
        try:
            super().__init__([search], max_calls_per_turn=max_calls_per_turn, system_prompt=system_prompt)
        except BaseException:
            self.close()
            raise

    @env_tool(policy=ToolPolicy(timeout_s=8.0, max_output_chars=2000))
    async def fetch(self, doc_id: str) -> str:
        """Read a whole document by its id (as given by search).

        Args:
            doc_id: A document id, e.g. "person-mira-castell".
        """
        return format_response(await fetch(f"{self.server.url}/docs/{quote(doc_id[:200], safe='')}", _LOCAL_ONLY))

    def sample_task(self, split: str, seed: int) -> Task:
        pool = _questions(split)
        q = random.Random(f"search-qa:{split}:{seed}").choice(pool)
        return Task(id=f"{split}-{seed}", prompt=q.text, answer=q.answer, split=split,
                    metadata={"person": q.person, "person_doc": q.person_doc, "town": q.town, "town_doc": q.town_doc})

    def new_state(self, task: Task) -> dict:
        return {"turns": 0}

    async def astep(self, action: str):
        if self.context is not None and not self._done:
            self.context.state["turns"] += 1  # the demonstrator reads where it is in the episode
        return await super().astep(action)

    def score(self, task: Task, answer: str) -> float:
        """1 when the answer names the right value and no other of its kind (river, province, year):
        naming every river would otherwise be right on every river question. The person's name is
        left out first, as some surnames are also rivers (Ravel)."""
        answer = re.sub(re.escape(task.metadata["person"]), " ", answer, flags=re.I)
        kind = next((k for k in (RIVERS, PROVINCES) if task.answer in k), None)
        if kind is None:  # a year: the only number of the answer
            return 1.0 if re.findall(r"\d+", answer) == [task.answer] else 0.0
        named = {v for v in kind if re.search(rf"\b{re.escape(v)}\b", answer, re.I)}
        return 1.0 if named == {task.answer} else 0.0

    def scripted_action(self, rng: random.Random, tool_use_prob: float = 1.0,
                        last_tool_output: str | None = None) -> str:
        """The demonstrator: search the person, fetch their page, search their town, fetch its page,
        answer. With probability `1 - tool_use_prob` it answers at once with a guess."""
        assert self.task is not None and self.context is not None, "call reset() first"
        meta, turn = self.task.metadata, self.context.state["turns"]
        if turn == 0 and rng.random() >= tool_use_prob:
            return f"It is {rng.choice(['Elm', 'Varn', '1500'])}."
        plan = [_call("search", query=meta["person"]), _call("fetch", doc_id=meta["person_doc"]),
                _call("search", query=meta["town"]), _call("fetch", doc_id=meta["town_doc"])]
        return plan[turn] if turn < len(plan) else f"The answer is {self.task.answer}."

    def close(self) -> None:
        """Close the episode and give the shared document server back (it stops with its last env)."""
        try:
            if hasattr(self, "toolsets"):  # ToolEnv.__init__ ran
                super().close()
        finally:
            if getattr(self, "server", None) is not None:
                self.server = None
                server.release()
