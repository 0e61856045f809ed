"""``hf-px push FOLDER --repo-id ID``: upload a saved checkpoint folder to the Hub in one commit."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "push",
        help="upload a saved checkpoint folder to the Hugging Face Hub",
        description="Upload FOLDER (written by save_pretrained) to the Hub as one commit. The token comes from "
        "HF_TOKEN or `hf auth login`, the endpoint from HF_ENDPOINT.",
    )
    p.add_argument("folder", help="checkpoint folder to upload")
    p.add_argument("--repo-id", required=True, help="target repo, e.g. user/minilm-px90 (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing); default main")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--max-retries", type=int, default=3, help="retries on transient errors (default 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.hub import HubPushError, push_to_hub

    try:
        url = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                          commit_message=args.commit_message, max_retries=args.max_retries)
    except HubPushError as err:
        print(f"hf-px push: error: {err}", file=sys.stderr)
        return 1
    print(url)
    return 0
