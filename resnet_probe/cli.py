"""``resnet-probe``: the command-line entry point.

Subcommands ``fit``, ``validate`` and ``test`` run LightningCLI (see
``resnet_probe.train.cli``); each study (``lesion``, ``response_std``, ..., ``quickstart``) runs with
its own options (``resnet_probe.studies.command``); ``report RUN_DIR`` rebuilds a run's report from
its saved tables; ``inspect FILE`` loads a checkpoint or torchvision state_dict safely and prints
what it holds. Heavy imports happen inside each branch, so ``resnet-probe --help`` is quick.
"""
from __future__ import annotations

import argparse
import sys

import resnet_probe
from resnet_probe.studies import STUDIES

TRAIN_SUBCOMMANDS = ("fit", "validate", "test")
STUDY_HELP = {
    "train_zoo": "train plain / highway / residual nets over depths and seeds (the other studies' input)",
    "degradation": "training error against depth (He et al. 2016, Fig. 1/6)",
    "response_std": "layer response std (He et al. 2016, Fig. 7) of any model",
    "gradients": "per-block gradients during training",
    "lesion": "delete and reorder blocks (Veit et al. 2016): resnet-probe lesion CHECKPOINT ...",
    "paths": "gradient per path length and effective paths (Veit et al. 2016, Fig. 6)",
    "highway": "highway gate statistics and gate closing (Srivastava et al. 2015)",
    "similarity": "linear CKA between blocks of one net and of two nets (Kornblith et al. 2019, minibatch CKA)",
    "refinement": "per block, cos(F(x), -dL/dF) and ||F(x)|| / ||x|| (Jastrzebski et al. 2018, iterative refinement)",
    "landscape": "loss surfaces along filter-normalised directions, plain vs residual (Li et al. 2018)",
    "shattered": "input-gradient correlation against input distance, at init and trained (Balduzzi et al. 2017)",
    "quickstart": "train small nets, run every study, one report (what `make demo` runs)",
}
SUBCOMMANDS = {
    "fit": "train a CIFAR network (LightningCLI; resume with --ckpt_path last --run_dir RUN)",
    "validate": "evaluate a checkpoint on the validation split",
    "test": "evaluate a checkpoint on the test split",
    **STUDY_HELP,
    "report": "rebuild a run folder's tables, figures and report: resnet-probe report RUN_DIR",
    "inspect": "load a checkpoint / torchvision state_dict safely and describe it",
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f"usage: resnet-probe {{{','.join(SUBCOMMANDS)}}} ...", "",
             "Measure why residual networks train and how they use their blocks.", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "`resnet-probe SUBCOMMAND --help` shows a subcommand's options, e.g.",
              "  resnet-probe fit --model.family plain --model.depth 56 --model.recipe fast --data.data auto"]
    return "\n".join(lines)


def inspect_main(argv: list[str]) -> int:
    """``resnet-probe inspect FILE``: kind, architecture, parameters and blocks of a model file."""
    from .checkpoints import TORCHVISION_ARCHS, CheckpointError, load_model
    from .models import anatomy, count_parameters

    parser = argparse.ArgumentParser(prog="resnet-probe inspect", description=inspect_main.__doc__)
    parser.add_argument("source", help="a .ckpt, a torchvision state_dict file, torchvision:NAME or timm:NAME")
    parser.add_argument("--arch", choices=TORCHVISION_ARCHS, default=None,
                        help="torchvision architecture of state_dict files (default: inferred from the keys)")
    parser.add_argument("--allow_unsafe_load", action="store_true",
                        help="load files that need arbitrary unpickling; this can run code from the file, so only "
                             "for files from a source you trust")
    args = parser.parse_args(argv)
    try:
        model, info = load_model(args.source, arch=args.arch, allow_unsafe=args.allow_unsafe_load)
    except CheckpointError as e:
        print(f"resnet-probe inspect: {e}", file=sys.stderr)
        return 1
    blocks = anatomy(model).names
    print(f"file:       {info['path'] or args.source}")
    print(f"kind:       {info['kind']}")
    print(f"arch:       {info['arch']}")
    print(f"parameters: {count_parameters(model):,}")
    print(f"blocks:     {len(blocks)} ({blocks[0]} ... {blocks[-1]})")
    for key, value in sorted(info["hparams"].items()):
        print(f"  {key} = {value!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``resnet-probe SUBCOMMAND ...``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"resnet-probe {resnet_probe.__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in TRAIN_SUBCOMMANDS:
        from .train.cli import RunDirError, cli_main
        try:
            cli_main([command, *rest])
        except RunDirError as e:  # a user error, found before anything was written
            print(f"resnet-probe {command}: {e}", file=sys.stderr)
            return 2
        return 0
    if command in STUDIES:
        from .studies.command import main as study_main
        return study_main(command, rest)
    if command == "report":
        from .report import rebuild_main
        return int(rebuild_main(rest) or 0)
    if command == "inspect":
        return inspect_main(rest)
    print(f"resnet-probe: unknown subcommand {command!r}; valid subcommands: {', '.join(SUBCOMMANDS)}\n",
          file=sys.stderr)
    print(usage(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
