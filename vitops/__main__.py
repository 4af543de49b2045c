"""`python -m vitops info [--json]`: versions, devices, and which backend runs each op, and why."""
import argparse
import json

from vitops._info import backend_info, format_info


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vitops")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="versions, devices, and which backend runs each op")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args()
    if args.command == "info":
        report = backend_info()
        print(json.dumps(report, indent=2) if args.json else format_info(report))


if __name__ == "__main__":
    main()
