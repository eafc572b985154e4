"""`streampage generate MODEL PROMPT...`: print completions (MODEL `demo` is the built-in demo model)."""

from __future__ import annotations

import argparse
import json
from dataclasses import MISSING, fields

from streampage.cli import add_engine_arguments, engine_options
from streampage.sampling_params import InvalidParameterError, SamplingParams

_LIST_FIELDS = {"stop": str, "stop_token_ids": int}
ENGINE_SKIP = ("model", "seed")  # the model is positional; --seed is the sampling seed here


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per SamplingParams field (`--max-tokens 32`, `--stop a --stop b`)."""
    group = parser.add_argument_group("sampling")
    for field in fields(SamplingParams):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not MISSING else None
        if field.name in _LIST_FIELDS:
            group.add_argument(flag, action="append", type=_LIST_FIELDS[field.name], default=None)
        elif str(field.type) == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})")
        else:
            kind = float if str(field.type).startswith("float") else int
            group.add_argument(flag, type=kind, default=None, help=f"(default {default})")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    given = {f.name: getattr(args, f.name) for f in fields(SamplingParams) if getattr(args, f.name, None) is not None}
    return SamplingParams(**given)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory, or 'demo' for the built-in demo model")
    parser.add_argument("prompts", nargs="+", help="one or more prompts")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per completion")
    add_sampling_arguments(parser)
    add_engine_arguments(parser, skip=ENGINE_SKIP)


def run(args: argparse.Namespace) -> int:
    from streampage.llm import LLM

    try:
        params = sampling_params(args)
    except InvalidParameterError as exc:
        raise SystemExit(f"streampage generate: {exc}") from None
    llm = LLM(None if args.model == "demo" else args.model, **engine_options(args, skip=ENGINE_SKIP))
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outputs = llm.generate(args.prompts, params)
    for output in outputs:
        for choice in output.outputs:
            if args.json:
                print(json.dumps({"prompt": output.prompt, "index": choice.index, "text": choice.text,
                                  "token_ids": choice.token_ids, "finish_reason": choice.finish_reason}))
            else:
                print(f"{output.prompt!r} -> {choice.text!r} ({choice.finish_reason})")
    return 0
