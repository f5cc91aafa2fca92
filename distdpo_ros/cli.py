"""The `distdpo` command: one entry point, one subcommand per job.

Each package owns its subcommands (`distdpo_ros.commands`, `distdpo_training.commands`: a table of
names to modules exposing `add_arguments(parser)` and `run(args) -> int`); this file merges the
tables and imports a command's module only when it runs, so `distdpo --help` is instant and the
vehicle runtime never imports the offline pipeline. Bad input raises UserError: one line on
stderr, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distdpo_ros import __version__
from distdpo_ros.errors import UserError
from distdpo_ros.validation import check_seed

# The packages whose command tables make up `distdpo`; the offline one is absent from a
# runtime-only install, and its commands are then simply not offered.
COMMAND_PACKAGES = ('distdpo_ros.commands', 'distdpo_training.commands')


def command_tables() -> tuple[dict[str, tuple[str, str]], dict[str, dict[str, tuple[str, str]]]]:
    """(commands, groups) merged from every importable package in COMMAND_PACKAGES.

    Each package's `COMMANDS` maps a name to (module, one-line help); its `GROUPS` maps a group
    name ("bench", "train", "ablate") to such a table, and groups of the same name are merged.
    """
    commands: dict[str, tuple[str, str]] = {}
    groups: dict[str, dict[str, tuple[str, str]]] = {}
    for package in COMMAND_PACKAGES:
        try:
            table = importlib.import_module(package)
        except ModuleNotFoundError as exc:
            if exc.name is None or not package.startswith(exc.name):
                raise
            continue
        commands.update(table.COMMANDS)
        for group, subs in table.GROUPS.items():
            groups.setdefault(group, {}).update(subs)
    return commands, groups


def _top_parser() -> argparse.ArgumentParser:
    commands, groups = command_tables()
    names = [(name, text) for name, (_, text) in commands.items()]
    names += [(f'{group} {name}', text) for group, subs in groups.items()
              for name, (_, text) in subs.items()]
    width = max(len(name) for name, _ in names) + 2
    lines = [f'  {name:<{width}}{text}' for name, text in names]
    parser = argparse.ArgumentParser(
        prog='distdpo', formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Few-step diffusion LiDAR scene completion (Distillation-DPO).',
        epilog='commands:\n' + '\n'.join(lines) + '\n\n`distdpo COMMAND --help` explains one.')
    parser.add_argument('--version', action='version', version=f'distdpo {__version__}')
    parser.add_argument('command', nargs='?', help='one of the commands below')
    return parser


def _resolve(argv: list[str]) -> tuple[str, str, str, list[str]]:
    """Return (prog name, module, help, remaining argv) or raise UserError for unknown names."""
    name = argv[0]
    commands, groups = command_tables()
    if name in commands:
        module, text = commands[name]
        return name, module, text, argv[1:]
    if name in groups:
        subs = groups[name]
        if len(argv) < 2 or argv[1] not in subs:
            raise UserError(f'`distdpo {name}` needs one of: {", ".join(subs)}')
        module, text = subs[argv[1]]
        return f'{name} {argv[1]}', module, text, argv[2:]
    raise UserError(f'unknown command {name!r}; `distdpo --help` lists them')


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `distdpo` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0].startswith('-'):
            _top_parser().parse_args(argv)
            _top_parser().print_help()
            return 0
        name, module_name, text, rest = _resolve(argv)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise UserError(f'`distdpo {name}` needs the missing Python module {exc.name!r}; '
                            'install the extras: pip install -e ".[train]"') from exc
        parser = argparse.ArgumentParser(prog=f'distdpo {name}', description=text)
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        if getattr(args, 'seed', None) is not None:  # every --seed is a 64-bit seed
            check_seed(args.seed, allow_random=True)
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f'distdpo: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('distdpo: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
