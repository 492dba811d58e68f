"""People rank responses in a local web app; `export` turns their rankings into D and P.

`qwen2-align annotators --recipe R --add NAME` makes a sign-in token per annotator (printed once; only its sha256
is stored). `qwen2-align annotate --recipe R`, on a recipe without `judge:`, loads `inputs.responses` into SQLite
(`database`, default `<run_dir>/annotations.sqlite`) and serves the ranking page on `host:port` to several
annotators at once. Each item goes to `annotators_per_item` people; an annotator sees the instruction and its
responses (their order shuffled per annotator, the models hidden), ranks them best first with the keyboard or the
mouse, marks responses unusable, skips an item (it comes back after the others) or discards it as a whole with a
reason. Every text is put on the page as text, never as markup, and the page runs under a content security policy
that allows no inline script. Each answer is committed to SQLite before the page hears back, so a crash of the
server loses no submitted ranking.

`qwen2-align annotate export --recipe R` reads a consistent snapshot of the database and writes, like the judge,
`rankings.jsonl`, `demonstrations.jsonl` and `preferences.jsonl` in `run_dir`. An item is exported once
`annotators_per_item` people finished it (else its ranking row says `pending`); it is `discarded` when at least as
many people discarded it as ranked it. The rankings merge by `merge` (Argilla's strategies): `mean` (mean
position), `min` (best position any annotator gave), `max` (worst position), `majority` (most first places, then
most second places, ...); ties keep the responses' order, and a response at least half of the rankers marked
unusable goes after every usable one, so it is never chosen (it may be rejected). The manifest gives agreement as
Krippendorff's alpha with the normalised Kendall-tau distance between rankings (>= 0.8 reliable, >= 0.667
tentative), over the items two or more people ranked; two rankings of different items are compared on the
response indices both have.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import random
import secrets
import signal
import sqlite3
import statistics
import threading
from contextlib import closing, suppress
from datetime import datetime, timedelta, timezone
from http.cookies import SimpleCookie
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, ClassVar

from alignment.data import DataError, Quarantined, read_rows
from alignment.stages import DataStage, Outcome, ShardContext, Stage, StageError

from .annotate import AnnotateRecipe, AnnotateStage, export, item_problem, model_summary

UI = Path(__file__).with_name("annotation_ui")
DRAFT_HOLD = timedelta(minutes=30)  # an item shown to someone counts towards its quota this long
SESSION_COOKIE = "qwen2_align_session"
MAX_BODY_BYTES = 64 * 1024  # the largest answer (a ranking and a discard reason) is far smaller
CONTROL_CHARACTERS = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}
FINISHED = ("submitted", "discarded")
# How many others answered item i or hold it now (a draft younger than the hold): what its quota counts.
HELD_BY_OTHERS = ("(SELECT COUNT(*) FROM annotations other WHERE other.item_id = i.id AND other.annotator != :me "
                  "AND (other.status IN ('submitted', 'discarded') OR (other.status = 'draft' "
                  "AND other.updated > :cutoff)))")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL, digest TEXT NOT NULL, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY, token_sha256 TEXT UNIQUE, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    session_sha256 TEXT PRIMARY KEY, annotator TEXT NOT NULL REFERENCES annotators(name), created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotations (
    item_id TEXT NOT NULL REFERENCES items(id), annotator TEXT NOT NULL REFERENCES annotators(name),
    status TEXT NOT NULL CHECK (status IN ('draft', 'skipped', 'submitted', 'discarded')),
    ranking TEXT, flagged TEXT, reason TEXT, updated TEXT NOT NULL,
    PRIMARY KEY (item_id, annotator));
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def database_path(recipe: AnnotateRecipe) -> Path:
    return Path(recipe.database) if recipe.database else Path(recipe.run_dir) / "annotations.sqlite"


def connect(path: Path) -> sqlite3.Connection:
    """A connection to an open database with full sync: a committed answer survives a crash of the process or
    machine (one per request: the settings below are per connection, WAL mode is the file's)."""
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


def open_database(path: Path) -> sqlite3.Connection:
    """`connect`, the file created if need be, in WAL mode and with the schema: once per command, not per request."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    with db:  # the key of each annotator's response order (`AnnotationApp.shown_order`), made once per database
        db.execute("INSERT OR IGNORE INTO secrets VALUES ('blinding', ?)", (secrets.token_hex(32),))
    return db


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def digest(row: dict) -> str:
    return sha256(json.dumps(row, sort_keys=True, ensure_ascii=False))


def since(age: timedelta) -> str:
    """The timestamp `age` ago, comparable with `now()`'s."""
    return (datetime.now(timezone.utc) - age).isoformat(timespec="seconds")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- rankings: merging and agreement ------------------------------------------------------------------------

MERGES: dict[str, Callable[[int, list[list[int]]], tuple]] = {
    "mean": lambda i, positions: (statistics.fmean(p[i] for p in positions), i),
    "min": lambda i, positions: (min(p[i] for p in positions), statistics.fmean(p[i] for p in positions), i),
    "max": lambda i, positions: (max(p[i] for p in positions), statistics.fmean(p[i] for p in positions), i),
    "majority": lambda i, positions: (*(-sum(p[i] == k for p in positions) for k in range(len(positions[0]))), i),
}


def positions(order: list[int]) -> list[int]:
    """Position of each response index in a best-first order."""
    where = [0] * len(order)
    for position, index in enumerate(order):
        where[index] = position
    return where


def merge_rankings(orders: list[list[int]], strategy: str, unusable: set[int] = frozenset()) -> list[int]:
    """One best-first order from several annotators' orders of the same responses (see the module docstring)."""
    where = [positions(order) for order in orders]
    key = MERGES[strategy]
    return sorted(range(len(orders[0])), key=lambda i: (i in unusable, key(i, where)))


def kendall_distance(a: list[int], b: list[int]) -> float:
    """Share of response pairs the two orders put the other way round, over the indices both hold."""
    common = sorted(set(a) & set(b))
    pairs = list(combinations(common, 2))
    if not pairs:
        return 0.0
    pa = {index: position for position, index in enumerate(a)}
    pb = {index: position for position, index in enumerate(b)}
    return sum((pa[i] < pa[j]) != (pb[i] < pb[j]) for i, j in pairs) / len(pairs)


def krippendorff_alpha(units: list[list[list[int]]]) -> float | None:
    """Krippendorff's alpha over items (units) each ranked by two or more people, with the Kendall distance:
    1 - observed / expected disagreement. None when there is nothing to compare or no variation at all."""
    units = [unit for unit in units if len(unit) >= 2]
    values = [order for unit in units for order in unit]
    n = len(values)
    if n < 2:
        return None
    observed = sum(sum(kendall_distance(a, b) for a, b in combinations(unit, 2)) * 2 / (len(unit) - 1)
                   for unit in units) / n
    expected = sum(kendall_distance(a, b) for a, b in combinations(values, 2)) * 2 / (n * (n - 1))
    return None if expected == 0 else 1 - observed / expected


def agreement_reading(alpha: float | None) -> str:
    if alpha is None:
        return "not measurable (needs items ranked by two or more people, with some variation)"
    return "reliable" if alpha >= 0.8 else "tentative" if alpha >= 0.667 else "unreliable"


def item_ranking(item: dict, annotations: list[dict], recipe: AnnotateRecipe) -> dict:
    """The ranking row of one item from its annotations (only finished ones count)."""
    finished = [a for a in annotations if a["status"] in FINISHED]
    ranked = [a for a in finished if a["status"] == "submitted"]
    responses = item["responses"]
    unusable = {i for i in range(len(responses)) if 2 * sum(i in a["flagged"] for a in ranked) >= len(ranked) > 0}
    row: dict[str, Any] = {
        "id": item["id"], "order": None, "scores": None,
        "judge": {"kind": "people", "merge": recipe.merge, "annotators": sorted(a["annotator"] for a in finished)},
        "responses": [{"model": r["model"], "strategy": r["strategy"]} for r in responses],
        "annotations": finished, "unusable": sorted(unusable),
    }
    if len(finished) < recipe.annotators_per_item:
        return row | {"status": "pending"}
    if len(finished) - len(ranked) >= len(ranked) or len(unusable) == len(responses):
        return row | {"status": "discarded"}
    return row | {"status": "ranked", "order": merge_rankings([a["ranking"] for a in ranked], recipe.merge, unusable)}


# ---- the database the app and the export share ---------------------------------------------------------------

def load_items(db: sqlite3.Connection, recipe: AnnotateRecipe) -> tuple[int, list[Quarantined]]:
    """Put the recipe's responses into the database (new ones appended; one nobody finished yet is updated);
    returns the items loaded and the rows that could not be."""
    try:
        read = read_rows(recipe.inputs["responses"], "any")
    except DataError as e:
        raise StageError(f"annotate: {e}") from None
    problems = list(read.quarantined)
    loaded = 0
    with db:
        db.execute("BEGIN IMMEDIATE")
        position = db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM items").fetchone()[0]
        seen: set[str] = set()
        for row in read.rows:
            problem = item_problem(row) or (f"id: duplicate id {row['id']!r}" if row["id"] in seen else None)
            if problem:
                problems.append(Quarantined(problem, row))
                continue
            seen.add(row["id"])
            stored = db.execute("SELECT digest FROM items WHERE id = ?", (row["id"],)).fetchone()
            if stored is None:
                db.execute("INSERT INTO items VALUES (?, ?, ?, ?)", (row["id"], position, digest(row), json.dumps(row)))
                position += 1
            elif stored["digest"] != digest(row):
                started = db.execute("SELECT COUNT(*) FROM annotations WHERE item_id = ? AND status IN (?, ?)",
                                     (row["id"], *FINISHED)).fetchone()[0]
                if started:
                    problems.append(Quarantined(f"id: {row['id']!r} changed after people annotated it; "
                                                "give the new version a new id", row))
                    continue
                db.execute("UPDATE items SET digest = ?, payload = ? WHERE id = ?",
                           (digest(row), json.dumps(row), row["id"]))
            loaded += 1
    return loaded, problems


def add_annotators(db: sqlite3.Connection, names: list[str]) -> dict[str, str]:
    """A new token per name (a new annotator, or a new token replacing the old one); returns name -> token."""
    tokens = {}
    with db:
        for name in names:
            if not name.strip() or len(name) > 64:
                raise StageError(f"annotators: name {name!r} must be 1 to 64 characters")
            tokens[name] = secrets.token_urlsafe(24)
            db.execute("INSERT INTO annotators VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET token_sha256 = "
                       "excluded.token_sha256", (name, sha256(tokens[name]), now()))
            db.execute("DELETE FROM sessions WHERE annotator = ?", (name,))
    return tokens


def revoke_annotators(db: sqlite3.Connection, names: list[str]) -> None:
    """Their tokens and sessions stop working and the item they hold goes back to the others; what they submitted
    stays."""
    with db:
        for name in names:
            if db.execute("UPDATE annotators SET token_sha256 = NULL WHERE name = ?", (name,)).rowcount == 0:
                raise StageError(f"annotators: no annotator named {name!r}")
            db.execute("DELETE FROM sessions WHERE annotator = ?", (name,))
            db.execute("DELETE FROM annotations WHERE annotator = ? AND status = 'draft'", (name,))


def annotations_by_item(db: sqlite3.Connection) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for a in db.execute("SELECT * FROM annotations WHERE status IN (?, ?) ORDER BY updated, annotator", FINISHED):
        found.setdefault(a["item_id"], []).append({
            "annotator": a["annotator"], "status": a["status"], "ranking": json.loads(a["ranking"] or "null"),
            "flagged": json.loads(a["flagged"] or "[]"), "reason": a["reason"], "updated": a["updated"]})
    return found


# ---- the web app -----------------------------------------------------------------------------------------------

class Refused(Exception):
    """A request the app answers with an HTTP error and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class AnnotationApp:
    """The ranking app's logic, one SQLite connection per request (the server runs a thread per request)."""

    def __init__(self, recipe: AnnotateRecipe):
        self.recipe = recipe
        self.path = database_path(recipe)

    def annotator(self, db: sqlite3.Connection, session: str | None) -> str:
        found = session and db.execute("SELECT annotator, created FROM sessions WHERE session_sha256 = ?",
                                       (sha256(session),)).fetchone()
        if not found:
            raise Refused(401, "sign in with your annotator token")
        if found["created"] < since(timedelta(hours=self.recipe.session_hours)):
            with db:
                db.execute("DELETE FROM sessions WHERE session_sha256 = ?", (sha256(session),))
            raise Refused(401, "your session has expired: sign in again with your annotator token")
        return found["annotator"]

    def sign_in(self, db: sqlite3.Connection, token: Any) -> tuple[str, str]:
        found = isinstance(token, str) and db.execute("SELECT name FROM annotators WHERE token_sha256 = ?",
                                                      (sha256(token.strip()),)).fetchone()
        if not found:
            raise Refused(401, "that token is not valid")
        session = secrets.token_urlsafe(32)
        with db:
            db.execute("INSERT INTO sessions VALUES (?, ?, ?)", (sha256(session), found["name"], now()))
        return found["name"], session

    def progress(self, db: sqlite3.Connection, me: str) -> dict[str, int]:
        mine = dict(db.execute("SELECT status, COUNT(*) FROM annotations WHERE annotator = ? GROUP BY status",
                               (me,)).fetchall())
        complete = db.execute("SELECT COUNT(*) FROM (SELECT item_id FROM annotations WHERE status IN (?, ?) "
                              "GROUP BY item_id HAVING COUNT(*) >= ?)",
                              (*FINISHED, self.recipe.annotators_per_item)).fetchone()[0]
        return {"done": sum(mine.get(s, 0) for s in FINISHED), "skipped": mine.get("skipped", 0),
                "left": len(self.open_items(db, me)), "items": db.execute("SELECT COUNT(*) FROM items").fetchone()[0],
                "complete": complete}

    def open_items(self, db: sqlite3.Connection, me: str, limit: int = -1) -> list[str]:
        """Items this annotator may take: not finished by them, their quota not filled by others; skipped last."""
        rows = db.execute(
            "SELECT i.id FROM items i LEFT JOIN annotations mine ON mine.item_id = i.id AND mine.annotator = :me "
            f"WHERE COALESCE(mine.status, 'open') IN ('open', 'skipped', 'draft') AND {HELD_BY_OTHERS} < :quota "
            "ORDER BY COALESCE(mine.status, 'open') = 'skipped', i.position LIMIT :limit",
            self.held_parameters(me) | {"limit": limit}).fetchall()
        return [r["id"] for r in rows]

    def held_parameters(self, me: str) -> dict[str, Any]:
        """The parameters of `HELD_BY_OTHERS` and its quota."""
        return {"me": me, "cutoff": since(DRAFT_HOLD), "quota": self.recipe.annotators_per_item}

    def shown_order(self, db: sqlite3.Connection, me: str, item_id: str, count: int) -> list[int]:
        """The responses' order for this annotator: the browser knows a response only by its place in it, so
        nobody can tell which model or strategy wrote which (index 0 is often the greedy one), and no position
        bias is shared by all annotators. Keyed by the database's secret: the order cannot be recomputed."""
        key = db.execute("SELECT value FROM secrets WHERE name = 'blinding'").fetchone()[0]
        order = list(range(count))
        random.Random(hmac.new(key.encode(), f"{me}\0{item_id}".encode(), hashlib.sha256).hexdigest()).shuffle(order)
        return order

    def taken_by_others(self, db: sqlite3.Connection, item_id: str, me: str) -> bool:
        """Whether other annotators' answers and held drafts fill the item's quota."""
        query = f"SELECT {HELD_BY_OTHERS} >= :quota FROM items i WHERE i.id = :item"
        return bool(db.execute(query, self.held_parameters(me) | {"item": item_id}).fetchone()[0])

    def next_item(self, db: sqlite3.Connection, me: str) -> dict:
        """The annotator's current item (kept across reloads), else the next open one, held for them as a draft."""
        with db:
            db.execute("BEGIN IMMEDIATE")
            draft = db.execute("SELECT item_id FROM annotations WHERE annotator = ? AND status = 'draft'",
                               (me,)).fetchone()
            item_id = draft["item_id"] if draft else next(iter(self.open_items(db, me, limit=1)), None)
            if item_id is not None:
                db.execute("INSERT INTO annotations (item_id, annotator, status, updated) VALUES (?, ?, 'draft', ?) "
                           "ON CONFLICT DO UPDATE SET status = 'draft', updated = excluded.updated",
                           (item_id, me, now()))
        shown = None
        if item_id is not None:
            item = json.loads(db.execute("SELECT payload FROM items WHERE id = ?", (item_id,)).fetchone()[0])
            order = self.shown_order(db, me, item_id, len(item["responses"]))
            shown = {"id": item_id, "prompt": [{"role": m["role"], "content": m["content"]} for m in item["prompt"]],
                     "responses": [{"index": place, "content": item["responses"][i]["content"]}
                                   for place, i in enumerate(order)]}
        return {"annotator": me, "item": shown, "progress": self.progress(db, me)}

    def answer(self, db: sqlite3.Connection, me: str, body: dict) -> dict:
        """Store a ranking (`submit`), a discard with its reason, or a skip of the annotator's current item."""
        item_id, action = body.get("item_id"), body.get("action")
        if not isinstance(item_id, str):
            raise Refused(400, "item_id: must be the id string of the item you are annotating")
        row = db.execute("SELECT i.payload, a.updated FROM annotations a JOIN items i ON i.id = a.item_id "
                         "WHERE a.item_id = ? AND a.annotator = ? AND a.status = 'draft'", (item_id, me)).fetchone()
        if row is None:
            raise Refused(409, f"item {item_id!r} is not the one you are annotating; reload the page")
        if action != "skip" and row["updated"] <= since(DRAFT_HOLD) and self.taken_by_others(db, item_id, me):
            with db:  # the idle draft stopped holding its slot, and others filled the quota meanwhile
                db.execute("DELETE FROM annotations WHERE item_id = ? AND annotator = ?", (item_id, me))
            raise Refused(409, f"item {item_id!r} went to others while it was left open; reload for the next one")
        count = len(json.loads(row["payload"])["responses"])
        ranking = flagged = reason = None
        if action == "submit":
            ranking, flagged = body.get("ranking"), body.get("flagged", [])
            if not (isinstance(flagged, list) and all(type(i) is int and 0 <= i < count for i in flagged)):
                raise Refused(400, f"flagged: must list response indices 0..{count - 1}")
            usable = sorted(set(range(count)) - set(flagged))
            if (not isinstance(ranking, list) or not all(type(i) is int for i in ranking) or sorted(ranking) != usable
                    or not usable):
                raise Refused(400, "ranking: rank every response not marked unusable, each once "
                                   "(to reject all of them, discard the item)")
            order = self.shown_order(db, me, item_id, count)  # places in the shown order -> the responses' indices
            ranking, flagged = [order[place] for place in ranking], sorted({order[place] for place in flagged})
            ranking, flagged = json.dumps(ranking + flagged), json.dumps(flagged)
        elif action == "discard":
            reason = body.get("reason") or ""
            if not isinstance(reason, str):
                raise Refused(400, "reason: must be text")
            reason = reason.strip()[:500] or "unusable"
        elif action != "skip":
            raise Refused(400, "action: must be submit, discard or skip")
        status = {"submit": "submitted", "discard": "discarded", "skip": "skipped"}[action]
        with db:
            db.execute("UPDATE annotations SET status = ?, ranking = ?, flagged = ?, reason = ?, updated = ? "
                       "WHERE item_id = ? AND annotator = ?", (status, ranking, flagged, reason, now(), item_id, me))
        return self.next_item(db, me)

    def sign_out(self, db: sqlite3.Connection, session: str | None) -> None:
        with db:
            db.execute("DELETE FROM sessions WHERE session_sha256 = ?", (sha256(session or ""),))


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
STATIC = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
          "/app.css": ("app.css", "text/css")}


class CappedServer(http.server.ThreadingHTTPServer):
    """A thread per connection, at most `max_connections` at once: one more is answered 503 and closed, so
    clients that open connections and send nothing cannot take every thread."""

    daemon_threads = True
    BUSY_BODY = b'{"error": "the server is busy"}'
    BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(BUSY_BODY), BUSY_BODY))

    def __init__(self, address: tuple[str, int], handler: type, max_connections: int):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            with suppress(OSError):
                request.sendall(self.BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def handler_for(app: AnnotationApp) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "qwen2-align-annotate"
        timeout = app.recipe.request_timeout_s  # the socket's: a silent or half-sent request is closed

        def send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (SECURITY_HEADERS | {"Content-Type": f"{content_type}; charset=utf-8",
                                                    "Content-Length": str(len(body))} | (headers or {})).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def session(self) -> str | None:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
            return cookie[SESSION_COOKIE].value if SESSION_COOKIE in cookie else None

        def do_GET(self) -> None:
            if self.path in STATIC:
                name, content_type = STATIC[self.path]
                self.send(200, (UI / name).read_bytes(), content_type)
            elif self.path.startswith("/api/"):  # every API call may change state (next claims an item): POST only
                self.send(405, b'{"error": "use POST"}', "application/json", {"Allow": "POST"})
            else:
                self.send(404, b"not found", "text/plain")

        def from_own_page(self) -> bool:
            """Whether a browser sent this from one of the app's own pages: browsers name the sender's origin
            (`Origin`, `Sec-Fetch-Site`) on every POST, so a page of another site or port cannot act for a
            signed-in annotator. Clients that send neither are not browsers and carry no one's cookie by accident."""
            site = self.headers.get("Sec-Fetch-Site")
            origin = self.headers.get("Origin")
            return (site is None or site == "same-origin") and (
                origin is None or origin == f"http://{self.headers.get('Host', '')}")

        def do_POST(self) -> None:
            if not self.from_own_page():
                self.send(403, b'{"error": "requests come from the app\'s own pages only"}', "application/json")
                return
            if self.headers.get("Content-Type", "").split(";")[0] != "application/json":
                self.send(415, b'{"error": "send JSON"}', "application/json")
                return
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                self.send(411, b'{"error": "send a Content-Length"}', "application/json")
                return
            if not 0 <= length <= MAX_BODY_BYTES:  # refused before a byte of it is read
                self.send(413, b'{"error": "the body is too large"}', "application/json", {"Connection": "close"})
                self.close_connection = True
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except (ValueError, UnicodeDecodeError, RecursionError):
                body = None
            if not isinstance(body, dict):
                self.send(400, b'{"error": "the body must be a JSON object"}', "application/json")
            elif self.path == "/api/sign-in":
                self.api(lambda db: self.signed_in(*app.sign_in(db, body.get("token"))))
            elif self.path == "/api/sign-out":
                self.api(lambda db: app.sign_out(db, self.session()) or {},
                         {"Set-Cookie": f"{SESSION_COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict"})
            elif self.path == "/api/next":
                self.api(lambda db: app.next_item(db, app.annotator(db, self.session())))
            elif self.path == "/api/answer":
                self.api(lambda db: app.answer(db, app.annotator(db, self.session()), body))
            else:
                self.send(404, b'{"error": "not found"}', "application/json")

        def signed_in(self, name: str, session: str) -> dict:
            self.cookie = f"{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict"
            return {"annotator": name}

        def api(self, call: Callable[[sqlite3.Connection], dict], headers: dict[str, str] | None = None) -> None:
            self.cookie = None
            try:
                with closing(connect(app.path)) as db:
                    status, payload = 200, call(db)
            except Refused as e:
                status, payload = e.status, {"error": str(e)}
            except Exception as e:  # noqa: BLE001 - a fault still gets an answer, never a dropped connection
                print(f"annotate: {self.path}: {type(e).__name__}: {e}".translate(CONTROL_CHARACTERS), flush=True)
                status, payload = 500, {"error": "the server could not answer; its log says why"}
            extra = dict(headers or {}) | ({"Set-Cookie": self.cookie} if self.cookie else {})
            self.send(status, json.dumps(payload, ensure_ascii=False).encode(), "application/json", extra)

        def log_message(self, format: str, *args: Any) -> None:
            """Request lines only (paths carry no secrets: tokens and sessions travel in bodies and cookies), control
            characters escaped so that a request cannot write lines of its own into the log."""
            line = (format % args).translate(CONTROL_CHARACTERS)
            print(f"annotate: {self.address_string()} {line}", flush=True)

    return Handler


def stop(*_: Any) -> None:
    """SIGTERM ends the server like Ctrl-C."""
    raise KeyboardInterrupt


def serve(recipe: AnnotateRecipe) -> None:
    """Load the items and serve the ranking app until Ctrl-C or SIGTERM."""
    with closing(open_database(database_path(recipe))) as db:
        loaded, problems = load_items(db, recipe)
        annotators = [r["name"] for r in db.execute("SELECT name FROM annotators WHERE token_sha256 IS NOT NULL")]
    for problem in problems:
        print(f"annotate: not loaded: {problem.origin or problem.row.get('id', '?')}: {problem.reason}")
    if not annotators:
        print("annotate: no annotators yet: qwen2-align annotators --recipe <recipe> --add NAME")
    server = CappedServer((recipe.host, recipe.port), handler_for(AnnotationApp(recipe)), recipe.max_connections)
    signal.signal(signal.SIGTERM, stop)
    print(f"annotate: {loaded} items ({len(problems)} not loaded), {recipe.annotators_per_item} annotator(s) each, "
          f"in {database_path(recipe)}; annotators: {', '.join(annotators) or 'none'}\n"
          f"annotate: serving http://{recipe.host}:{server.server_address[1]}/ (Ctrl-C stops; "
          "then: qwen2-align annotate export --recipe <recipe>)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("annotate: stopped; every submitted answer is in the database")
    finally:
        server.server_close()


# ---- export -----------------------------------------------------------------------------------------------------

class PeopleExportStage(DataStage):
    """The people's rankings in a database snapshot -> rankings, D and P, like the judge's run."""

    name = "annotate"
    recipe_class = AnnotateRecipe
    inputs = {"responses": "any"}
    outputs = ("rankings", "demonstrations", "preferences")

    def __init__(self, recipe: AnnotateRecipe, snapshot: Path):
        super().__init__(recipe)
        self.snapshot = snapshot

    def input_files(self) -> dict[str, str]:
        return {"annotations": str(self.snapshot)}

    def prepare(self, rows: list[dict], side_inputs: dict[str, list[dict]]) -> None:
        with closing(sqlite3.connect(f"file:{self.snapshot}?mode=ro", uri=True)) as db:
            db.row_factory = sqlite3.Row
            self.digests = {r["id"]: r["digest"] for r in db.execute("SELECT id, digest FROM items")}
            self.annotations = annotations_by_item(db)
        self.duplicates: set[int] = set()  # positions of rows whose id an earlier exported row has
        exported: set[str] = set()
        for position, row in enumerate(rows):
            if item_problem(row):
                continue
            if row["id"] in exported:
                self.duplicates.add(position)
            elif self.digests.get(row["id"], digest(row)) == digest(row):
                exported.add(row["id"])

    def process(self, rows: list[dict], ctx: ShardContext) -> list[Outcome]:
        outcomes: list[Outcome] = []
        start = ctx.index * self.recipe.shard_size
        for position, row in enumerate(rows, start):
            duplicate = f"id: duplicate id {row['id']!r}" if position in self.duplicates else None
            problem = item_problem(row) or duplicate
            if not problem and row["id"] in self.digests and self.digests[row["id"]] != digest(row):
                problem = f"id: {row['id']!r} differs from the version people annotated"
            if problem:
                outcomes.append(Quarantined(problem, row))
                continue
            ranking = item_ranking(row, self.annotations.get(row["id"], []), self.recipe)
            rows_out = export(row, ranking, None, self.recipe.pairs_per_item, ctx.seed) \
                if ranking["status"] == "ranked" else {}
            outcomes.append({"rankings": [ranking], **rows_out})
        return outcomes

    def finish(self, outputs: dict[str, list[dict]], side_inputs: dict[str, list[dict]]) -> dict[str, Any]:
        rankings = outputs["rankings"]
        ranked = [[a["ranking"] for a in r["annotations"] if a["status"] == "submitted"] for r in rankings]
        alpha = krippendorff_alpha(ranked)
        statuses = {s: sum(r["status"] == s for r in rankings) for s in ("ranked", "discarded", "pending")}
        by_annotator: dict[str, dict[str, int]] = {}
        for r in rankings:
            for a in r["annotations"]:
                counts = by_annotator.setdefault(a["annotator"], {"submitted": 0, "discarded": 0})
                counts[a["status"]] += 1
        return {"annotate": {
            "mode": "people", "merge": self.recipe.merge, "annotators_per_item": self.recipe.annotators_per_item,
            "items": statuses, "demonstrations": len(outputs["demonstrations"]),
            "preferences": len(outputs["preferences"]),
            "agreement": {"krippendorff_alpha_kendall": alpha, "reading": agreement_reading(alpha),
                          "items": sum(len(u) >= 2 for u in ranked)},
            "by_annotator": dict(sorted(by_annotator.items())),
            "by_model_strategy": model_summary([r for r in rankings if r["status"] == "ranked"])}}


def export_annotations(recipe: AnnotateRecipe) -> dict[str, Any]:
    """Export what people submitted so far (a fresh export each time, from a snapshot taken now)."""
    if recipe.judge:
        raise StageError("annotate export: this recipe ranks with a judge, whose run already wrote D and P; "
                         "export is for people's rankings (a recipe without `judge:`)")
    source = database_path(recipe)
    if not source.is_file():
        raise StageError(f"annotate export: {source}: no annotations database; serve the app first "
                         "(qwen2-align annotate --recipe <recipe>)")
    run_dir = Path(recipe.run_dir)
    manifest = run_dir / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("annotate", {}).get("mode") != "people":
        raise StageError(f"annotate export: {run_dir} holds a judge's run; choose another run_dir for people's rankings")
    for stale in (manifest, run_dir / "fingerprint", *sorted((run_dir / "shards").glob("*"))):
        stale.unlink(missing_ok=True)
    snapshot = run_dir / "annotations.snapshot.sqlite"
    partial = snapshot.with_name("." + snapshot.name)
    partial.unlink(missing_ok=True)
    with closing(connect(source)) as db, closing(sqlite3.connect(partial)) as copy:
        db.backup(copy)  # a consistent copy even while the app is writing
    os.replace(partial, snapshot)
    return PeopleExportStage(recipe, snapshot).run()


def manage_annotators(recipe: AnnotateRecipe, add: list[str], revoke: list[str]) -> None:
    """Add (or give a new token to) and revoke annotators; print each new token once."""
    with closing(open_database(database_path(recipe))) as db:
        revoke_annotators(db, revoke)
        for name, token in add_annotators(db, add).items():
            print(f"{name}\t{token}")
        listed = db.execute("SELECT name, token_sha256 IS NOT NULL AS active FROM annotators ORDER BY name").fetchall()
    print("annotators: " + (", ".join(f"{r['name']}{'' if r['active'] else ' (revoked)'}" for r in listed) or "none")
          + f" in {database_path(recipe)}")


class Annotate(Stage):
    """`annotate`: with `judge:` a model ranks (an `AnnotateStage` run); without it people rank in the app, served
    until stopped. Its action `annotate export` writes D and P from what people submitted so far."""

    name = "annotate"
    recipe_class = AnnotateRecipe
    actions: ClassVar[dict[str, str]] = {"export": "write D and P from the people's rankings submitted so far"}

    def run(self) -> dict[str, Any] | None:
        return AnnotateStage(self.recipe).run() if self.recipe.judge else serve(self.recipe)

    def export(self) -> dict[str, Any]:
        return export_annotations(self.recipe)

    def annotators(self, add: list[str], revoke: list[str]) -> None:
        manage_annotators(self.recipe, add, revoke)
