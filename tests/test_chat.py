"""`minigpt chat`, driven through a pseudo-terminal (pexpect) as a person would: replies stream in
the Alpaca template the model was finetuned on and equal the library's for the same context;
the oldest turns are dropped, and said so, when the conversation outgrows the context;
/reset, /exit, Ctrl-D and Ctrl-C end or clear it cleanly; bad settings are one line."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from minigpt.chat import Conversation
from minigpt.checkpoint import save_checkpoint
from minigpt.config import ModelConfig
from minigpt.model import GPTModel
from minigpt.serving import load_language_model, stream_continuation
from minigpt.tokenizer import N_VOCAB

CONSOLE_SCRIPT = Path(sys.executable).parent / "minigpt"
CFG = ModelConfig(vocab_size=N_VOCAB, context_length=64, emb_dim=32, n_heads=2, n_layers=1)
SETTINGS = {"max_new_tokens": 12, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 3}
FLAGS = [f"--{key.replace('_', '-')}={value}" for key, value in SETTINGS.items()]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("chat") / "instruct.safetensors"
    info = {"config": {"finetune": {"task": "instruction"}}, "model_config": CFG.model_dump()}
    save_checkpoint(path, GPTModel(CFG), None, {"step": 3, "run_info": info})
    return path


def start(*args: str) -> pexpect.spawn:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"OMP_NUM_THREADS": "1"}
    return pexpect.spawn(str(CONSOLE_SCRIPT), list(args), env=env, encoding="utf-8", timeout=60,
                         dimensions=(50, 400))


def expected_replies(path: Path, messages: list[str]) -> tuple[list[str], list[int]]:
    """What the library answers each message with, and how many turns each drops."""
    model, _ = load_language_model(path)
    conversation = Conversation(CFG.context_length, SETTINGS["max_new_tokens"])
    replies, drops = [], []
    for message in messages:
        ids, dropped, _ = conversation.prompt(message)
        reply = "".join(stream_continuation(model, ids, **SETTINGS))
        conversation.add(ids, reply)
        replies.append(reply)
        drops.append(dropped)
    return replies, drops


def reply_of(child: pexpect.spawn) -> str:
    child.expect_exact("bot> ")
    child.expect_exact("\r\nyou> ")
    return child.before.replace("\r\n", "\n")


def test_replies_stream_in_the_template_and_old_turns_are_dropped_to_fit(checkpoint):
    messages = ["Name a colour.", "And another one?", "Thanks."]
    replies, drops = expected_replies(checkpoint, messages)
    assert drops[1:] != [0, 0], "the test wants a conversation that outgrows the 64-token context"
    child = start("chat", "--model", str(checkpoint), *FLAGS)
    child.expect_exact("(64-token context); /reset forgets the conversation")
    child.expect_exact("you> ")
    for message, reply, dropped in zip(messages, replies, drops):
        child.sendline(message)
        if dropped:
            child.expect_exact(f"oldest turn{'s' if dropped > 1 else ''} dropped: the conversation must fit "
                               f"the model's 64-token context)")
        assert reply_of(child) == reply
    # /reset forgets: the first message is answered as at the start.
    child.sendline("/reset")
    child.expect_exact("(conversation forgotten)")
    child.sendline(messages[0])
    assert reply_of(child) == replies[0]
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("key, status", [("\x04", 0), ("\x03", 130)])  # Ctrl-D, Ctrl-C
def test_ctrl_d_and_ctrl_c_end_the_chat_cleanly(checkpoint, key, status):
    child = start("chat", "--model", str(checkpoint), *FLAGS)
    child.expect_exact("you> ")
    child.send(key)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == status
    assert "Traceback" not in child.before


def test_a_model_that_was_not_instruction_tuned_is_said_so(tmp_path):
    path = tmp_path / "pretrain.safetensors"
    save_checkpoint(path, GPTModel(CFG), None, {"step": 1, "run_info": {"config": {"model": CFG.model_dump()}}})
    child = start("chat", "--model", str(path))
    child.expect_exact("note: this checkpoint was not instruction-tuned")
    child.sendeof()
    child.expect(pexpect.EOF)


@pytest.mark.parametrize("flag, message", [("--temperature=-1", "temperature must be >= 0"),
                                           ("--max-new-tokens=64", "leaves no room for a message")])
def test_bad_settings_are_one_line_before_the_chat_starts(checkpoint, flag, message):
    child = start("chat", "--model", str(checkpoint), flag)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    lines = [line for line in child.before.splitlines() if line.strip()]
    assert lines[-1].startswith("minigpt: error: ") and message in lines[-1]
    assert "you> " not in child.before
