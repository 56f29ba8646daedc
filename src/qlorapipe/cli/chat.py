"""Run a fine-tuned model: the 4-bit base with one or several adapters, or a merged/exported model.

    qlorapipe-chat --adapter models/adapter                       # interactive, streamed
    qlorapipe-chat --adapter models/adapter --mode demo           # the evaluate.prompts of params.yaml
    qlorapipe-chat --model models/export --mode text --prompt "The with statement"
    qlorapipe-chat --model models/export/onnx/int8                # in ONNX Runtime GenAI
    qlorapipe-chat --adapter chat=models/adapter --adapter code=/tmp/code-adapter --mode compare

With adapters, the base (``--base``, default: the base path in dvc.yaml) is loaded once, quantized as the
first adapter's training_params.json records, and every adapter is attached to it by name
(peft's ``load_adapter``); switching between them is ``set_adapter``, the base stays loaded.
In interactive mode ``/use NAME`` switches adapter, ``/base`` turns adapters off, ``/quit`` ends.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from qlorapipe import modeling
from qlorapipe.cli.paths import pipeline_path
from qlorapipe.errors import UserError
from qlorapipe.inference import (
    BASE,
    LoadedModel,
    SamplingSettings,
    load_standalone,
    load_with_adapters,
    parse_adapter_specs,
)
from qlorapipe.params import load_section


def interactive(loaded: LoadedModel, settings: SamplingSettings, stdin: TextIO, stdout: TextIO) -> int:
    """Read prompts line by line, stream each answer; returns the number of prompts answered."""
    answered = 0
    commands = "/use NAME, /base, /quit" if loaded.adapters else "/quit"
    print(f"Type a prompt ({commands}).", file=stdout)
    while True:
        print(f"[{loaded.active}]> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("/quit", "/exit"):
            print(file=stdout)
            return answered
        prompt = line.strip()
        if not prompt:
            continue
        if prompt.startswith("/use ") or prompt == "/base":
            try:
                loaded.use(prompt.removeprefix("/use ").strip() if prompt != "/base" else BASE)
            except UserError as exc:
                print(f"error: {exc}", file=stdout)
            continue
        loaded.answer(prompt, settings, streamer=text_streamer(loaded.tokenizer, stdout))
        answered += 1


def text_streamer(tokenizer, stream: TextIO):
    """transformers' TextStreamer, writing the answer to ``stream`` (it prints to stdout) as it is decoded."""
    from transformers import TextStreamer

    class StreamTo(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return StreamTo(tokenizer, skip_prompt=True, skip_special_tokens=True)


def run_prompts(loaded: LoadedModel, prompts: list[str], settings: SamplingSettings, stdout: TextIO) -> list[str]:
    """Answer each prompt in turn, streaming; returns the answers."""
    answers = []
    for prompt in prompts:
        print(f"### {prompt}", file=stdout, flush=True)
        answers.append(loaded.answer(prompt, settings, streamer=text_streamer(loaded.tokenizer, stdout)))
        print(file=stdout)
    return answers


def compare_adapters(loaded: LoadedModel, prompts: list[str], settings: SamplingSettings,
                     stdout: TextIO) -> dict[str, list[str]]:
    """Each adapter's answer (and the base's) to the same prompts, switching without reloading the base.

    Returns:
        answers by adapter name, ``base`` first.
    """
    answers = {name: [loaded.answer(p, settings, adapter=name) for p in prompts]
               for name in [BASE, *loaded.adapters]}
    width = max(len(name) for name in answers)
    for i, prompt in enumerate(prompts):
        print(f"### {prompt}", file=stdout)
        for name, texts in answers.items():
            print(f"{name:>{width}}: {' '.join(texts[i].split())}", file=stdout)
        print(file=stdout)
    return answers


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qlorapipe-chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                        help="adapter directory on the 4-bit base; repeat to load several")
    source.add_argument("--model", type=Path, help="a merged or exported model directory, a .gguf file, or an "
                        "ONNX folder (models/export/onnx/<precision>, run by ONNX Runtime GenAI)")
    parser.add_argument("--base", type=Path,
                        help="the download stage's base model for --adapter (default: dvc.yaml's base path)")
    parser.add_argument("--mode", choices=("interactive", "demo", "text", "compare"), default="interactive")
    parser.add_argument("--prompt", action="append", default=[], help="text mode: the prompt (repeatable)")
    parser.add_argument("--use", metavar="NAME", help="the adapter that answers (default: the first)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="demo mode reads evaluate.prompts")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top_p", "--top-p", type=float, default=0.9)
    parser.add_argument("--chat-template", dest="chat_template", action=argparse.BooleanOptionalAction,
                        default=None, help="wrap prompts in the tokenizer's chat template (default: if it has one)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    args = parser.parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout

    settings = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p, args.chat_template)
    problems = settings.check()
    if args.mode == "text" and not args.prompt:
        problems.append("--mode text needs --prompt TEXT")
    if args.mode == "compare" and not args.adapter:
        problems.append("--mode compare needs at least one --adapter")
    if problems:
        raise UserError("; ".join(problems))
    adapters = parse_adapter_specs(args.adapter)
    prompts = args.prompt
    if args.mode in ("demo", "compare") and not prompts:
        evaluate = load_section(args.params, "evaluate")
        prompts = evaluate.prompts
        if not prompts:
            raise UserError(f"{args.params}: evaluate.prompts is empty; add prompts or pass --prompt")
        if args.chat_template is None:  # the prompts are written for evaluate.chat_template
            settings = replace(settings, chat_template=evaluate.chat_template)

    import torch

    torch.manual_seed(args.seed)
    device = modeling.pick_device()
    loaded = (load_with_adapters(args.base or pipeline_path("base"), adapters, device) if adapters
              else load_standalone(args.model or pipeline_path("export"), device))
    if args.use:
        loaded.use(args.use)
    if args.mode == "interactive":
        interactive(loaded, settings, stdin, stdout)
    elif args.mode == "compare":
        compare_adapters(loaded, prompts, settings, stdout)
    else:
        run_prompts(loaded, prompts, settings, stdout)


def cli() -> None:
    """Console entry point (``qlorapipe-chat``): a UserError is one red line and exit status 1."""
    from qlorapipe.console import run_stage

    run_stage(main, exit_when_done=False)  # a console command, callable in-process too


if __name__ == "__main__":
    cli()
