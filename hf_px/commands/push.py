"""``hf-px push FOLDER --hub-model-id ID``: upload a saved checkpoint folder to the Hub in one commit.

The Hub flags have the names they have in ``hf-px prune``/``finetune`` (``--hub-model-id``, ``--hub-private``);
the former ``--repo-id`` and ``--private`` still work, hidden, with a deprecation note.
"""

from __future__ import annotations

import argparse
import sys

from .flags import add_deprecated_alias

HELP = "upload a saved checkpoint folder to the Hugging Face Hub"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help=HELP,
        description="Upload FOLDER (written by save_pretrained, hf-px prune or hf-px run) to the Hub as one commit. "
        "The token comes from HF_TOKEN or `hf auth login`, the endpoint from HF_ENDPOINT.",
    )
    p.add_argument("folder", help="checkpoint folder to upload.")
    # not required=True for argparse: the deprecated --repo-id may give it instead (checked in run)
    repo = p.add_argument("--hub-model-id", default=None, metavar="HUB_MODEL_ID",
                          help="target repo, e.g. user/minilm-px90 (created if missing). Required.")
    add_deprecated_alias(p, "--repo-id", repo)
    private = p.add_argument("--hub-private", action="store_true", help="create the repo as private.")
    add_deprecated_alias(p, "--private", private)
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing); default main.")
    p.add_argument("--commit-message", default=None, help="commit message.")
    p.add_argument("--max-retries", type=int, default=3, help="retries on transient errors (default 3).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..export.hub import HubPushError, push_to_hub

    if not args.hub_model_id:
        raise ConfigError("--hub-model-id is required: the Hub repo to upload to, e.g. user/minilm-px90.")
    try:
        url = push_to_hub(args.folder, args.hub_model_id, private=args.hub_private, revision=args.revision,
                          commit_message=args.commit_message, max_retries=args.max_retries)
    except HubPushError as err:
        print(f"hf-px push: error: {err}", file=sys.stderr)
        return 1
    print(url)
    return 0
