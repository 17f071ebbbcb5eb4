"""search-qa-v0: the BM25 index, fetch through the safe HTTP client from the local server, two hops,
person-disjoint splits, the server's lifetime, and the contract checks."""

from __future__ import annotations

import json
import random
import socket
import threading

import pytest

from agentrl.envs import check_env, make
from agentrl_search_qa import server
from agentrl_search_qa.corpus import PROVINCES, RIVERS, build
from agentrl_search_qa.env import _is_test


def _call(name, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def test_the_collection_is_fixed_and_its_answers_are_in_its_documents():
    docs, questions = build()
    assert (len(docs), len(questions)) == (208, 480)
    by_id = {d.id: d for d in docs}
    for q in questions:
        assert q.town in by_id[q.person_doc].text and q.answer in by_id[q.town_doc].text


def test_bm25_finds_a_person_by_name_first():
    docs, questions = build()
    for q in questions[::30]:
        assert server.search(q.person)[0].id == q.person_doc
    assert server.search("zzzz qqqq") == [] and server.search("") == []
    assert len(server.search("x" * 1_000_000)) <= 3  # bounded query


def test_the_demonstrator_answers_in_two_hops_through_the_local_server():
    env = make("search-qa-v0")
    try:
        env.reset(seed=7, options={"split": "test"})
        rng, outputs, reward = random.Random(0), [], 0.0
        for _ in range(6):
            obs, reward, term, _, info = env.step(env.scripted_action(rng))
            outputs += [m.content for m in obs]
            if term:
                break
        assert reward == 1.0 and env.context.state["turns"] == 5
        assert any(env.task.metadata["town"] in o and "was born in" in o for o in outputs)  # fetched hop one
    finally:
        env.close()


def test_fetch_refuses_what_is_not_a_document_and_never_leaves_127_0_0_1():
    env = make("search-qa-v0")
    try:
        env.reset(seed=0)
        obs, *_ = env.step(_call("fetch", doc_id="../../etc/passwd"))
        assert obs[0].content.startswith("HTTP 404")
        obs, *_ = env.step(_call("fetch", doc_id="x" * 10_000))
        assert obs[0].content.startswith("HTTP 404")
    finally:
        env.close()


def test_splits_are_disjoint_by_person():
    env = make("search-qa-v0")
    try:
        people = {s: set() for s in env.splits}
        for split in env.splits:
            for seed in range(400):
                env.reset(seed=seed, options={"split": split})
                people[split].add(env.task.metadata["person"])
        assert not people["train"] & people["test"]
        assert all(_is_test(p) for p in people["test"]) and len(people["test"]) > 20
    finally:
        env.close()


def test_the_server_is_shared_and_stops_with_the_last_env():
    envs = [make("search-qa-v0") for _ in range(3)]
    url = envs[0].server.url
    assert all(e.server is envs[0].server for e in envs)
    port = int(url.rsplit(":", 1)[1])
    for env in envs:
        env.close()
        env.close()
    assert not server.running()
    assert not any(t.name == "search-qa-docs" for t in threading.enumerate())
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_check_env_passes():
    report = check_env("search-qa-v0", episodes=5, max_turns=6)
    assert report.ok, [(r.name, r.detail) for r in report.failures]
    assert not server.running()


def test_an_answer_that_lists_every_candidate_scores_nothing():
    env = make("search-qa-v0")
    try:
        kinds = {}
        for seed in range(60):
            task = env.sample_task("test", seed)
            kinds.setdefault(task.prompt.split()[2], task)  # "which river", "which province", "which year"
        assert len(kinds) == 3
        for task in kinds.values():
            pool = RIVERS if task.answer in RIVERS else PROVINCES if task.answer in PROVINCES else ("1500", "1800")
            assert env.score(task, f"The answer is {task.answer}.") == 1.0
            assert env.score(task, f"It is {task.answer.lower()}, as {task.metadata['person']} said.") == 1.0
            assert env.score(task, "It is " + " or ".join((*pool, task.answer))) == 0.0
            assert env.score(task, "I do not know.") == 0.0
    finally:
        env.close()


def test_a_client_that_hangs_up_leaves_no_traceback_but_other_errors_do(capsys):
    httpd = server.acquire().httpd
    try:
        for error, printed in ((BrokenPipeError(32, "Broken pipe"), False), (ValueError("a real bug"), True)):
            try:
                raise error
            except Exception:
                httpd.handle_error(None, ("127.0.0.1", 1))
            assert (type(error).__name__ in capsys.readouterr().err) == printed
    finally:
        server.release()
