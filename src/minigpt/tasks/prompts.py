"""The Alpaca prompt template: an instruction, an optional input, then the response.

The prompt ends with the response header, so a model continues it with the answer;
training sees `format_prompt(record) + record["output"]` followed by `<|endoftext|>`.
"""

from __future__ import annotations

from collections.abc import Mapping

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
RESPONSE_HEADER = "\n\n### Response:\n"


def format_prompt(record: Mapping[str, str]) -> str:
    """Everything before the response: preamble, instruction, the input if there is one."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{record['instruction']}"
    if record.get("input"):
        text += f"\n\n### Input:\n{record['input']}"
    return text + RESPONSE_HEADER
