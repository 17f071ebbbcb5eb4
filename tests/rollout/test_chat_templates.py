"""Chat templates that rewrite history, on real tokenizers: what `ChatRenderer` accepts, keeps and refuses.

The templates (tests/fixtures/chat_templates) reproduce real behaviours: Qwen3's reasoning handling,
Mistral's system-prompt move, role alternation and 9-character tool-call ids, the strict role rule of
older templates. The invariant checked throughout: the trainer's ids are the prompt ids, then each
turn's sampled ids and observation ids, and each engine request's prompt is exactly the ids so far.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from test_agent_loop import ScriptedEngine
from transformers import AutoTokenizer

from agentrl.envs import Message, make
from agentrl.errors import ChatTemplateError
from agentrl.rollout.agent_loop import EpisodeLimits, EpisodeSpec, run_episode
from agentrl.rollout.chat import ChatRenderer, first_difference, strip_reasoning
from agentrl.rollout.engine import SamplingParams
from agentrl.tools.parsers import get_parser


def _qwen_call(expr: str) -> str:
    return '<tool_call>\n{"name": "calculator", "arguments": ' + json.dumps({"expression": expr}) + "}\n</tool_call>"


def _play(renderer, env, turns, seed=3, split="test"):
    engine = ScriptedEngine(renderer, turns)
    traj, messages = asyncio.run(run_episode(engine, env, renderer, SamplingParams(), EpisodeLimits(6, 4096),
                                             EpisodeSpec(seed=seed, split=split)))
    return traj, messages, engine


def _assert_ids_are_sampled_plus_observations(renderer, traj, messages, engine):
    """Rebuild the ids from the conversation: prompt, then per turn the sampled ids and the observation ids."""
    opening = next(i for i, m in enumerate(messages) if m.role == "assistant")
    ids = renderer.prompt_ids(messages[:opening])
    rest = messages[opening:]
    i = 0
    while i < len(rest):
        ids += renderer.assistant_ids(rest[i].content)
        obs = []
        i += 1
        while i < len(rest) and rest[i].role != "assistant":
            obs.append(rest[i])
            i += 1
        if obs:
            ids += renderer.observation_ids(obs)
    assert list(traj.token_ids) == ids
    for prompt, (start, _) in zip(engine.prompts, traj.turn_spans):
        assert prompt == list(traj.token_ids[:start])  # every request saw exactly the ids so far
    return opening


@pytest.fixture()
def qwen3(qwen3_model_dir):
    return AutoTokenizer.from_pretrained(qwen3_model_dir)


def test_qwen3_tool_episodes_run_to_completion(qwen3):
    env = make("calculator-v0")
    renderer = ChatRenderer(qwen3, env.tool_schemas())
    # The probe turn has the shape of a real sampled turn: the template's own reasoning block.
    assert renderer.model_turn == "<think>\nprobe reasoning\n</think>\n\nprobe answer"
    env.reset(seed=3, options={"split": "test"})
    expr, answer = env.task.metadata["expression"], env.task.answer
    turns = ["<think>\nI should use the tool.\n</think>\n\n" + _qwen_call(expr + " +"),  # a tool error
             "<think>\nThat call was malformed; fix it.\n</think>\n\n" + _qwen_call(expr),
             f"<think>\nThe tool says {answer}.\n</think>\n\nThe answer is {answer}."]
    traj, messages, engine = _play(renderer, env, turns)
    assert traj.error is None and traj.truncation is None and traj.reward == 1.0 and traj.num_turns == 3
    assert traj.tool_errors == {"invalid_arguments": 1}
    opening = _assert_ids_are_sampled_plus_observations(renderer, traj, messages, engine)
    # Tool episodes have one user query, so the template keeps every turn's reasoning: a full
    # re-render of the conversation is exactly the token stream (plus the newline after the last turn).
    decoded = renderer.decode(traj.token_ids)
    assert renderer.render_episode(messages[:opening], messages[opening:]) == decoded + "\n"
    assert decoded.count("<tool_response>") == 2 and decoded.count("<think>") == 3


class FeedbackEnv:
    """A guessing game whose feedback comes back as user turns (as Gymnasium text games do)."""

    def tool_schemas(self):
        return []

    async def areset(self, seed=None, options=None):
        self.turn = 0
        return (Message("system", "Guess the number."), Message("user", "It is between 1 and 9.")), {}

    async def astep(self, action):
        self.turn += 1
        done = "5" in action.split("</think>")[-1]
        return (() if done else (Message("user", "higher"),)), float(done), done, False, {}


def test_qwen3_reasoning_dropped_by_the_template_is_kept_in_the_token_stream(qwen3):
    renderer = ChatRenderer(qwen3)
    turns = ["<think>\nStart low.\n</think>\n\n3", "<think>\nHigher than 3.\n</think>\n\n4",
             "<think>\nHigher than 4.\n</think>\n\n5"]
    with pytest.warns(UserWarning, match="drops earlier turns' reasoning"):
        traj, messages, engine = _play(renderer, FeedbackEnv(), turns)
    assert traj.error is None and traj.reward == 1.0 and traj.num_turns == 3
    opening = _assert_ids_are_sampled_plus_observations(renderer, traj, messages, engine)
    decoded = renderer.decode(traj.token_ids)
    rendered = renderer.render_episode(messages[:opening], messages[opening:])
    # The template strips the first two turns' reasoning (a new user query follows them); agentrl keeps
    # it, and that is the only difference.
    assert decoded.count("<think>") == 3 and rendered.count("<think>") == 1
    assert strip_reasoning(rendered) == strip_reasoning(decoded) + "\n"


def test_qwen3_non_thinking_mode(qwen3):
    env = make("calculator-v0")
    renderer = ChatRenderer(qwen3, env.tool_schemas(), template_kwargs={"enable_thinking": False})
    env.reset(seed=3, options={"split": "test"})
    expr, answer = env.task.metadata["expression"], env.task.answer
    with pytest.warns(UserWarning, match="drops earlier turns' reasoning"):
        traj, messages, engine = _play(renderer, env, [_qwen_call(expr), f"The answer is {answer}."])
    assert traj.error is None and traj.reward == 1.0
    _assert_ids_are_sampled_plus_observations(renderer, traj, messages, engine)
    # Each generation prompt pre-fills an empty reasoning block, which a re-render drops from earlier
    # turns; the token stream keeps what the model saw.
    assert renderer.decode(traj.token_ids).count("<|im_start|>assistant\n<think>\n\n</think>\n\n") == 2


@pytest.fixture()
def mistral(mistral_model_dir):
    return AutoTokenizer.from_pretrained(mistral_model_dir)


def test_mistral_system_prompt_move_is_refused_with_the_offending_text(mistral):
    env = make("calculator-v0")
    renderer = ChatRenderer(mistral, env.tool_schemas())
    with pytest.raises(ChatTemplateError) as caught:  # the rollout side's checks before a run stop it here
        renderer.prompt_ids(list(env.reset(seed=3, options={"split": "test"})[0]))
    text = str(caught.value)
    assert "not append-only" in text and "adding the model's first turn" in text
    # Met inside an episode, the same refusal fails that episode only, classified and with its text.
    traj, _, _ = _play(ChatRenderer(mistral, env.tool_schemas()), env, ["anything"])
    assert traj.failure == "template_refused" and traj.num_model_tokens == 0
    assert "ChatTemplateError" in traj.error and "not append-only" in traj.error
    assert "the token stream has 'Use the calculator, then answer.\\n\\n" in text  # the system prompt that moves


def test_mistral_tool_episode_with_tool_call_ids(mistral):
    env = make("calculator-v0", system_prompt=None)
    env.parse = get_parser("mistral")
    renderer = ChatRenderer(mistral, env.tool_schemas())
    env.reset(seed=3, options={"split": "test"})
    expr, answer = env.task.metadata["expression"], env.task.answer
    call = "[TOOL_CALLS]" + json.dumps([{"name": "calculator", "arguments": {"expression": expr}, "id": "call00000"}])
    traj, messages, engine = _play(renderer, env, [call, f"The answer is {answer}."])
    assert traj.error is None and traj.reward == 1.0
    _assert_ids_are_sampled_plus_observations(renderer, traj, messages, engine)
    assert messages[2] == Message("tool", answer, name="calculator", tool_call_id="call00000")
    assert '[TOOL_RESULTS]{"call_id": "call00000", "content": "' + answer + '"}[/TOOL_RESULTS]' in \
        renderer.decode(traj.token_ids)


def test_tool_messages_without_ids_are_refused_with_the_templates_message(mistral):
    renderer = ChatRenderer(mistral)
    with pytest.raises(ChatTemplateError, match="tool call ids must be 9 alphanumeric characters"):
        renderer.observation_ids([Message("tool", "4", name="calculator")])
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        renderer.observation_ids([Message("user", "a"), Message("user", "b")])


def test_strict_role_templates_refuse_tool_results(strict_roles_model_dir):
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(strict_roles_model_dir))
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate") as caught:
        renderer.observation_ids([Message("tool", "4", name="calculator")])
    assert "(roles: user, assistant, tool)" in str(caught.value)
    assert renderer.decode(renderer.observation_ids([Message("user", "go on")])) == \
        "\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n"


def test_first_difference_and_strip_reasoning():
    # The strings part at index 9 ("S" against "U"); 6 characters of context either side.
    assert first_difference("<s>[INST]S\n\nU", "<s>[INST]U", "prompt", "re-render", context=6) == \
        "at character 9, after '[INST]': prompt has 'S\\n\\nU', re-render has 'U'"
    # One string a prefix of the other: they part where the shorter ends.
    assert first_difference("ab", "abc", context=2).startswith("at character 2, after 'ab': expected has ''")
    assert strip_reasoning("a<think>\nx\n</think>\n\nb [THINK]y[/THINK] c") == "ab c"
