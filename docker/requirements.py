"""Print the project's requirements for the given extras, one a line, read from pyproject.toml.

The image builds install these before copying the source, so a source change does not
reinstall the dependencies (the slow layer). Usage: python3 requirements.py serve [train ...]
"""

import sys
import tomllib


def main(argv: list[str]) -> int:
    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project.get("optional-dependencies", {})
    unknown = [e for e in argv if e not in extras]
    if unknown:
        print(f"requirements.py: unknown extra {', '.join(unknown)} (known: {', '.join(extras)})",
              file=sys.stderr)
        return 2
    lines = list(project.get("dependencies", []))
    for extra in argv:
        lines += [r for r in extras[extra] if r not in lines]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
