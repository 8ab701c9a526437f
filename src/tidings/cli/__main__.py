"""``python -m tidings.cli``: how `tidings run --workers N` starts its worker processes."""

from tidings.cli import main

if __name__ == "__main__":
    main()
