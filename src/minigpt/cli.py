"""The `minigpt` console script: continue a prompt with a trained model, or describe a checkpoint.

    minigpt generate --model checkpoints/best.safetensors "ROMEO:"
    minigpt generate --model runs:/<run id>/checkpoint "ROMEO:" --temperature 0.8 --seed 1
    minigpt generate --model models:/<name>/<version> "ROMEO:"
    minigpt generate --model models:/minigpt@champion "ROMEO:"
    minigpt export --format gguf --precision q8_0 checkpoints/best.safetensors model.gguf
    minigpt export --format hf checkpoints/best.safetensors hf-model/
    minigpt chat --model checkpoints/finetune/best.safetensors
    minigpt info checkpoints/best.safetensors

A model is always a minigpt checkpoint (safetensors: nothing pickled is ever loaded), its
architecture read from the config it holds. An MLflow URI names the checkpoint a run logged:
`runs:/<id>/<path>` is downloaded (`checkpoint`, or the `generator` model, which carries the
same weights); `models:/<name>/<version>` and `models:/<name>@<alias>` stand for the
`checkpoint` of the run that logged that version. MLflow is imported for those URIs only, from MLFLOW_TRACKING_URI or ./mlflow.db.
`generate` prints the prompt, then its continuation as it comes, as the `generator` model
answers (the same text for the same checkpoint, prompt and settings).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import yaml

from minigpt.checkpoint import read_checkpoint_state
from minigpt.export import GGUF_PRECISIONS, export_gguf, export_hf
from minigpt.chat import Conversation
from minigpt.tokenizer import EOT_ID
from minigpt.serving import GENERATION_DEFAULTS, load_language_model, stream_continuation, stream_text
from minigpt.utils import pick_device

_URI_SCHEMES = ("runs:/", "models:/")
# A chat samples by default (greedy replies to a small model repeat themselves), reproducibly.
CHAT_DEFAULTS: dict[str, int | float | None] = {**GENERATION_DEFAULTS, "max_new_tokens": None, "temperature": 0.7,
                                         "top_k": 50, "top_p": 0.95}
_SETTING_HELP = {
    "max_new_tokens": "generate at most this many tokens (it stops earlier at <|endoftext|>)",
    "temperature": "0 is greedy; higher samples more freely",
    "top_k": "sample among the k likeliest tokens only (0: all)",
    "top_p": "sample from the smallest set of tokens whose probability reaches p (1: all)",
    "seed": "seed of the sampler: the same seed and settings give the same text",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minigpt", description="Generate text with a trained minigpt model.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="continue a prompt, printing the text as it comes")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, metavar="CHECKPOINT|URI",
                     help="a checkpoint file, runs:/<run id>/<path>, models:/<name>/<version> or models:/<name>@<alias>")
    for key, default in GENERATION_DEFAULTS.items():
        gen.add_argument(f"--{key.replace('_', '-')}", type=type(default), default=default,
                         help=f"{_SETTING_HELP[key]} (default {default})")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    gen.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                     help="weights to decode with: bf16 halves the memory read per token (default fp32)")
    info = commands.add_parser("info", help="what a checkpoint holds: config, step, losses, fingerprints")
    info.add_argument("model", metavar="CHECKPOINT|URI")
    chat = commands.add_parser("chat", help="talk to an instruction-tuned model, replies streamed as they come")
    chat.add_argument("--model", required=True, metavar="CHECKPOINT|URI",
                      help="an instruction finetune's checkpoint (or runs:/..., models:/... URI)")
    for key, default in CHAT_DEFAULTS.items():
        chat.add_argument(f"--{key.replace('_', '-')}", type=int if default is None else type(default), default=default,
                          help=f"{_SETTING_HELP[key]} (default {default or 'half the context, at most 128'})")
    chat.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    export = commands.add_parser("export", help="write the model for other tools: GGUF (llama.cpp) or a "
                                                "Hugging Face GPT-2 folder (transformers)")
    export.add_argument("model", metavar="CHECKPOINT|URI")
    export.add_argument("out", metavar="OUT", help="the .gguf file, or the folder for --format hf")
    export.add_argument("--format", choices=("gguf", "hf"), required=True)
    export.add_argument("--precision", default="f32",
                        help=f"GGUF weights: {', '.join(GGUF_PRECISIONS)} (default f32; norms and biases stay f32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with local_checkpoint(args.model) as path:
            if args.command == "info":
                print(describe(path, args.model))
                return 0
            if args.command == "export":
                return export(path, args)
            if args.command == "chat":
                return chat(path, args)
            model, _ = load_language_model(path, pick_device(args.device), args.precision)
        settings = {key: getattr(args, key) for key in GENERATION_DEFAULTS}
        print_stream(args.prompt, stream_text(model, args.prompt, **settings), sys.stdout)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, like a command killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141
    except (ValueError, OSError) as err:  # CheckpointError and the tokenizer's DataError are ValueErrors
        print(f"minigpt: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


def print_stream(prompt: str, pieces: Iterator[str], out: TextIO) -> None:
    """The prompt, then each piece of its continuation the moment it comes."""
    first = next(pieces, "")  # a bad setting raises here, before anything is printed
    out.write(prompt + first)
    out.flush()
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")


CHAT_HELP = "/reset forgets the conversation, /exit (or Ctrl-D) ends it"


def chat(path: Path, args: argparse.Namespace) -> int:
    """`minigpt chat`: read a message, stream the reply, until /exit, Ctrl-D (exit 0) or Ctrl-C (130)."""
    model, state = load_language_model(path, pick_device(args.device))
    settings = {key: getattr(args, key) for key in CHAT_DEFAULTS}
    if settings["max_new_tokens"] is None:  # room for replies and for the conversation before them
        settings["max_new_tokens"] = min(128, model.cfg.context_length // 2)
    conversation = Conversation(model.cfg.context_length, settings["max_new_tokens"])
    next(stream_continuation(model, [EOT_ID], **{**settings, "max_new_tokens": 1}), None)  # a bad setting fails now
    task = (((state.get("run_info") or {}).get("config") or {}).get("finetune") or {}).get("task")
    print(f"minigpt chat with {args.model} ({model.cfg.context_length}-token context); {CHAT_HELP}")
    if task != "instruction":
        print("note: this checkpoint was not instruction-tuned (finetune.task=instruction): expect it to "
              "continue the template rather than answer")
    while True:
        try:
            message = input("you> ")
        except EOFError:  # Ctrl-D
            print()
            return 0
        if message.strip() == "/exit":
            return 0
        if message.strip() == "/reset":
            conversation.reset()
            print("(conversation forgotten)")
            continue
        if not message.strip():
            continue
        ids, dropped, cut = conversation.prompt(message)
        if dropped:
            print(f"(the {dropped} oldest turn{'s' if dropped > 1 else ''} dropped: the conversation must fit "
                  f"the model's {model.cfg.context_length}-token context)")
        if cut:
            print(f"(your message was cut to its last {conversation.room} tokens)")
        sys.stdout.write("bot> ")
        pieces = []
        for piece in stream_continuation(model, ids, **settings):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        conversation.add(ids, "".join(pieces))


def export(path: Path, args: argparse.Namespace) -> int:
    """`minigpt export`: the checkpoint's model as a GGUF file or a Hugging Face folder."""
    if args.format == "gguf" and args.precision not in GGUF_PRECISIONS:
        raise ValueError(f"--precision {args.precision}: expected one of {', '.join(GGUF_PRECISIONS)}")
    if args.format == "hf" and args.precision != "f32":
        raise ValueError(f"--precision {args.precision}: a Hugging Face export is written in f32 "
                         f"(transformers converts on load: torch_dtype=...)")
    model, _ = load_language_model(path)
    if args.format == "gguf":
        written = export_gguf(model, args.out, args.precision, name=Path(path).stem)
    else:
        written = export_hf(model, args.out)
    size = sum(f.stat().st_size for f in ([written] if written.is_file() else written.iterdir()))
    print(f"wrote {written} ({args.format}, {size / 2**20:.1f} MiB)")
    return 0


# --------------------------------------------------------------------------- where the checkpoint is
@contextlib.contextmanager
def local_checkpoint(source: str) -> Iterator[Path]:
    """A checkpoint file for `source`: the path as given, or an MLflow URI's checkpoint
    downloaded into a temporary folder that is removed afterwards."""
    if not source.startswith(_URI_SCHEMES):
        if not Path(source).is_file():
            raise ValueError(f"{source}: no such file (a checkpoint, runs:/<run id>/<path> or models:/<name>/<version>)")
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="minigpt-") as tmp:
        yield download_checkpoint(source, Path(tmp))


def download_checkpoint(uri: str, dest: Path) -> Path:
    """The one `.safetensors` file that the artifact `uri` names or holds, downloaded into `dest`."""
    scheme, first, second = _parse_uri(uri)
    import mlflow  # here, not at the top: the library works without MLflow; only URIs need it
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking_uri = _tracking_uri()
    if not sys.stderr.isatty():  # a log or a pipe keeps every frame of MLflow's download progress bars
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        artifact_uri = uri
        if scheme == "models":
            client = MlflowClient(tracking_uri)
            version = (client.get_model_version_by_alias(first, second[1:]) if second.startswith("@")
                       else client.get_model_version(first, second))
            run_id = version.run_id
            if not run_id:
                raise ValueError(f"{uri}: this version was not logged by a run, so it has no minigpt checkpoint")
            artifact_uri = f"runs:/{run_id}/checkpoint"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dest),
                                                          tracking_uri=tracking_uri))
    except MlflowException as err:
        raise ValueError(f"{uri}: {str(err).splitlines()[0]}") from None
    found = [local] if local.is_file() else sorted(local.rglob("*.safetensors"))
    if not found:
        raise ValueError(f"{uri}: holds no minigpt checkpoint (.safetensors); a pickled model is never loaded: "
                         f"use runs:/<run id>/checkpoint or runs:/<run id>/generator")
    if len(found) > 1:
        names = ", ".join(p.relative_to(local).as_posix() for p in found)
        raise ValueError(f"{uri}: holds several checkpoints ({names}); name one in the URI")
    return found[0]


def _parse_uri(uri: str) -> tuple[str, str, str]:
    """("runs", run id, artifact path), ("models", name, version) or ("models", name, "@alias");
    a ValueError if malformed."""
    scheme, _, rest = uri.partition(":/")
    if scheme == "models" and "@" in rest:
        name, _, alias = rest.partition("@")
        if not (name and alias) or "/" in rest:
            raise ValueError(f"{uri}: expected models:/<name>@<alias>, e.g. models:/minigpt@champion")
        return scheme, name, f"@{alias}"
    first, _, second = rest.partition("/")
    if scheme == "models" and not (first and second.isdigit()):
        raise ValueError(f"{uri}: expected models:/<name>/<version> (a number) or models:/<name>@<alias>")
    if scheme == "runs" and not (first and second.strip("/")):
        raise ValueError(f"{uri}: expected runs:/<run id>/<artifact path>, e.g. runs:/<run id>/checkpoint")
    return scheme, first, second


def _tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the project's store ./mlflow.db (MLflow's default too), which
    must exist: MLflow would create an empty one and then report every run as not found."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    store = Path("mlflow.db")
    if not store.is_file():
        raise ValueError("no MLflow store here (./mlflow.db): run from the project's root or set MLFLOW_TRACKING_URI")
    return f"sqlite:///{store.resolve()}"


# --------------------------------------------------------------------------- info
def describe(path: Path, source: str) -> str:
    """What `minigpt info` prints: the checkpoint's summary, then its whole run config."""
    state = read_checkpoint_state(path)
    info = state.get("run_info") or {}
    config = info.get("config") or {}
    finetune = config.get("finetune")
    model = info.get("model_config") or config.get("model") or {}
    rows = {
        "checkpoint": source,
        "stage": f"finetune ({finetune.get('task')})" if finetune else "pretrain",
        "step": state.get("step"),
        "tokens seen": state.get("tokens_seen"),
        "best val loss": _number(state.get("best_val_loss")),
        "last val loss": _number(state.get("last_val_loss")),
        "model": " ".join(f"{k}={v}" for k, v in model.items()),
        "data sha256": info.get("data_sha256"),
        "code sha256": info.get("code_sha256"),
        "tokenizer sha256": info.get("tokenizer_sha256"),
        "init sha256": info.get("init_sha256"),
        "mlflow run": info.get("mlflow_run_id"),
    }
    width = max(map(len, rows))
    lines = [f"{key + ':':<{width + 1}} {value}" for key, value in rows.items() if value not in (None, "")]
    if config:
        lines += ["config:", textwrap.indent(yaml.safe_dump(config, sort_keys=False), "  ").rstrip()]
    return "\n".join(lines)


def _number(value: float | None) -> str | None:
    """A loss to 4 decimals; None for one never measured (no evaluation yet: inf)."""
    return None if value is None or math.isinf(value) else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
