"""A small in-memory stand-in for the Hugging Face Hub HTTP API, for push/download tests (test fixture only).

It speaks the part of the protocol that ``huggingface_hub`` 2.4 uses for ``create_repo``, ``create_branch``,
``upload_folder`` (preupload, NDJSON commit with inline files, and git-LFS: batch API + PUT upload; Xet must
be disabled on the client), ``repo_info``/``model_info``, ``list_repo_tree`` and file download
(``HEAD``/``GET .../resolve/{rev}/{path}`` with ``X-Repo-Commit`` and ``ETag``), with the Hub's error
headers (``X-Error-Code: RepoNotFound|RevisionNotFound|EntryNotFound``). Only ``token`` is accepted; any
other bearer token gets 401, like the Hub's "Invalid credentials" answer.

    with FakeHub() as hub:        # hub.endpoint == "http://127.0.0.1:<port>"
        ...
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"
ROUTES = [  # (methods, regex on the unquoted path, handler name)
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", rf"/api/{REPO}/preupload/(?P<rev>.+)", "preupload"),
    ("POST", rf"/api/{REPO}/commit/(?P<rev>.+)", "commit"),
    ("POST", rf"/api/{REPO}/branch/(?P<branch>.+)", "create_branch"),
    ("GET", rf"/api/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("GET", rf"/api/{REPO}(?:/revision/(?P<rev>.+))?", "info"),
    ("POST", r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_put"),
    ("HEAD GET", r"/(?:(?P<type>dataset|space)s/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
     "resolve"),
]


def _route(method: str, path: str) -> tuple[str, dict]:
    for verbs, pattern, name in ROUTES:
        m = re.fullmatch(pattern, path)
        if method in verbs.split() and m:
            return name, m.groupdict()
    raise HubError(404, f"no route {method} {path}")


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.body = status, message, code, body or {}


@dataclass
class Blob:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        # the client compares these with its own: sha256 for LFS files, git blob sha1 for regular ones
        if self.lfs:
            return hashlib.sha256(self.data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)

    def files(self, rev: str) -> tuple[str, dict[str, Blob]]:
        sha = self.branches.get(rev, rev)
        if sha not in self.commits:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha, self.commits[sha]


class FakeHub:
    """The server: ``endpoint`` while running; ``repos`` and ``requests`` are open for assertions."""

    def __init__(self, token: str = "hf_fake_write_token", lfs_threshold: int = 64 * 1024):
        self.token, self.lfs_threshold = token, lfs_threshold
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_next: list[int] = []  # statuses to answer to the next requests (transient-error tests)
        self.lfs_put_status: int | None = None  # answer every LFS upload (PUT) with this status (storage outage)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.hub = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------------------------------- helpers
    def _repo(self, type_: str | None, repo_id: str, authed: bool) -> Repo:
        repo = self.repos.get((type_ or "model", repo_id))
        if repo is None or (repo.private and not authed):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _need_token(self, authed: bool) -> None:
        if not authed:
            raise HubError(401, "You must be authenticated to write")

    # ------------------------------------------------------------------------------------------- handlers
    def create_repo(self, req: dict, authed: bool, **_: str):
        self._need_token(authed)
        repo_id = "/".join(p for p in (req.get("organization"), req["name"]) if p)
        key = (req.get("type") or "model", repo_id)
        url = f"{self.endpoint}/{repo_id}"
        if key in self.repos:
            raise HubError(409, "You already created this model repo", body={"url": url})
        private = req.get("visibility") == "private" or bool(req.get("private"))
        sha = uuid.uuid4().hex + "00000000"
        self.repos[key] = Repo(repo_id, private, branches={"main": sha}, commits={sha: {}})
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def delete_repo(self, req: dict, authed: bool, **_: str):
        self._need_token(authed)
        repo_id = "/".join(p for p in (req.get("organization"), req["name"]) if p)
        self._repo(req.get("type"), repo_id, authed)
        del self.repos[(req.get("type") or "model", repo_id)]
        return 200, {}

    def validate_yaml(self, req: dict, authed: bool, **_: str):
        return 200, {"errors": [], "warnings": []}

    def preupload(self, req: dict, authed: bool, type: str, repo: str, rev: str):
        self._need_token(authed)
        _, files = self._repo(type, repo, authed).files(rev)
        answer = []
        for f in req["files"]:
            old = files.get(f["path"])
            answer.append({"path": f["path"], "uploadMode": "lfs" if f["size"] > self.lfs_threshold else "regular",
                           "shouldIgnore": False, "oid": old.oid if old else None})
        return 200, {"files": answer}

    def commit(self, lines: list[dict], authed: bool, type: str, repo: str, rev: str):
        self._need_token(authed)
        r = self._repo(type, repo, authed)
        if rev not in r.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = dict(r.commits[r.branches[rev]])
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise HubError(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = Blob(self.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
        sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        r.commits[sha], r.branches[rev] = files, sha
        return 200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{sha}", "commitOid": sha,
                     "success": True, "pullRequestUrl": None}

    def create_branch(self, req: dict, authed: bool, type: str, repo: str, branch: str):
        self._need_token(authed)
        r = self._repo(type, repo, authed)
        if branch in r.branches:
            raise HubError(409, "Reference already exists")
        r.branches[branch], _ = r.files(req.get("startingPoint") or "main")
        return 200, {}

    def info(self, req: dict, authed: bool, type: str, repo: str, rev: str | None):
        r = self._repo(type, repo, authed)
        sha, files = r.files(rev or "main")
        return 200, {"id": repo, "modelId": repo, "sha": sha, "private": r.private, "tags": [],
                     "siblings": [{"rfilename": p} for p in sorted(files)]}

    def tree(self, req: dict, authed: bool, type: str, repo: str, rev: str, path: str | None):
        _, files = self._repo(type, repo, authed).files(rev)
        prefix = f"{path.rstrip('/')}/" if path else ""
        recursive = req.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                b = files[p]
                entry = {"type": "file", "path": p, "size": len(b.data), "oid": Blob(b.data, False).oid}
                if b.lfs:
                    entry["lfs"] = {"oid": b.oid, "size": len(b.data), "pointerSize": 134}
                entries.append(entry)
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in folders]
        return 200, entries

    def lfs_batch(self, req: dict, authed: bool, type: str | None, repo: str):
        self._need_token(authed)
        self._repo(type, repo, authed)
        objects = []
        for obj in req["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_put(self, body: bytes, oid: str):
        if self.lfs_put_status is not None:
            raise HubError(self.lfs_put_status, "injected LFS storage failure")
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its sha256")
        self.lfs_objects[oid] = body
        return 200, {}

    def resolve(self, req: dict, authed: bool, type: str | None, repo: str, rev: str, path: str):
        sha, files = self._repo(type, repo, authed).files(rev)
        if path not in files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"commit": sha})
        blob = files[path]
        return 200, blob.data, {"X-Repo-Commit": sha, "ETag": f'"{blob.oid}"',
                                "Content-Type": "application/octet-stream"}


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1.0"

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: object, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _dispatch(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = self._body() if self.command in ("POST", "PUT", "DELETE") else b""
        with hub.lock:
            hub.requests.append((self.command, path))
            try:
                if hub.fail_next:
                    raise HubError(hub.fail_next.pop(0), "injected failure")
                auth = self.headers.get("Authorization", "")
                if auth and auth != f"Bearer {hub.token}" and not path.startswith("/lfs-upload/"):
                    raise HubError(401, "Invalid credentials in Authorization header")
                name, args = _route(self.command, path)
                if name == "lfs_put":
                    result = hub.lfs_put(body, **args)
                else:
                    if name == "commit":
                        req: object = [json.loads(line) for line in body.splitlines() if line.strip()]
                    else:
                        req = json.loads(body) if body else query
                    result = getattr(hub, name)(req, auth == f"Bearer {hub.token}", **args)
            except HubError as err:
                headers = {"X-Error-Message": err.message, **({"X-Error-Code": err.code} if err.code else {})}
                self._send(err.status, {"error": err.message, **err.body}, headers)
                return
        self._send(*result)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch
