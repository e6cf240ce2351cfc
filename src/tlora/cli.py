"""``tlora`` command line: generate, train, demo (more subcommands live beside their modules).

Bad input is one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional

from .errors import UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="diffusers pipeline: local folder or hub id")
    p.add_argument("--weights", required=True, help="tlora .safetensors file (schedule read from its header)")
    p.add_argument("--prompt", action="append", default=[], help="prompt; repeat for more")
    p.add_argument("--prompts-file", help="text file, one prompt per line")
    p.add_argument("--negative-prompt")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed..seed+N-1)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (official inference: 25)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default per family: SD1.5 7.5, SDXL 5.0, SD3 7.0, Flux 3.5, Flux.2 4.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multiplier", type=float, default=1.0, help="adapter strength")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-mask", action="store_true", help="adapters at full rank at every step (for comparison)")
    p.add_argument("--out", required=True, help="output folder: PNGs, grid.png, generate.json")


def _cmd_generate(a: argparse.Namespace) -> int:
    from .generate import GenerateSettings, read_prompts_file, run_generate
    prompts = list(a.prompt) + (read_prompts_file(a.prompts_file) if a.prompts_file else [])
    s = GenerateSettings(model=a.model, weights=a.weights, prompts=prompts, out=a.out,
                         negative_prompt=a.negative_prompt, num_images=a.num_images, steps=a.steps,
                         guidance=a.guidance, seed=a.seed, multiplier=a.multiplier, height=a.height,
                         width=a.width, dtype=a.dtype, device=a.device, mask=not a.no_mask)
    out = run_generate(s)
    print(f"wrote {out}/grid.png and {out}/generate.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tlora", description="T-LoRA: timestep-dependent LoRA for diffusion models")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="sample a stock pipeline with a T-LoRA attached and masked per step")
    _generate_args(g)
    g.set_defaults(func=_cmd_generate)
    from . import demo, train
    train.add_cli(sub)
    demo.add_cli(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    parser = build_parser()
    args = parser.parse_args(argv)
    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()   # our own bars show progress; loading bars are noise
    transformers.utils.logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"tlora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
