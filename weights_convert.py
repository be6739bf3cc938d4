"""Convert official checkpoints to m3ddm safetensors. (placeholder entry point: filled in by its issue)."""
import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description="Convert official checkpoints to m3ddm safetensors.")
    p.parse_args(argv)
    print("error: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
