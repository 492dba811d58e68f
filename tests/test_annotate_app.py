"""People's ranking app: agreement and merging on hand-computed cases, item hand-out between annotators, and an
end-to-end run in headless Chromium (Debian's, installed by `make install`) against the real server process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from data_synthesis.annotate_app import (AnnotationApp, Refused, add_annotators, item_ranking, kendall_distance,
                                         krippendorff_alpha, load_items, merge_rankings, open_database,
                                         revoke_annotators)
from qwen2_align.stage_table import load_recipe

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def item(item_id: str, *contents: str) -> dict:
    return {"id": item_id, "prompt": [{"role": "user", "content": f"Question {item_id}?"}],
            "responses": [{"content": c, "model": f"model-{i % 2}", "strategy": "greedy" if i == 0 else "sampled"}
                          for i, c in enumerate(contents)], "source": "test", "meta": {"topic": item_id}}


ITEMS = [
    item("q1", "plain answer one", "<img src=x onerror=\"window.__xss = 2\">", "<script>window.__xss = 1</script>"),
    item("q2", "second: alpha", "second: beta", "second: gamma"),
    item("q3", "third: yes", "third: no"),
]


def write_recipe(tmp_path: Path, per_item: int, port: int = 8765, rows: list = ITEMS) -> Path:
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "annotate.yaml"
    recipe.write_text(f"stage: annotate\nrun_dir: {tmp_path / 'run'}\ninputs:\n  responses: {responses}\n"
                      f"port: {port}\nannotators_per_item: {per_item}\nmerge: mean\npairs_per_item: 1\n")
    return recipe


# ---- agreement and merging --------------------------------------------------------------------------------------

def test_kendall_distance_counts_swapped_pairs():
    assert kendall_distance([0, 1, 2], [0, 1, 2]) == 0
    assert kendall_distance([0, 1, 2], [2, 1, 0]) == 1
    assert kendall_distance([2, 0, 1], [2, 1, 0]) == pytest.approx(1 / 3)
    assert kendall_distance([0, 1, 2, 3], [1, 0]) == 1  # only the indices both rankings hold


def test_krippendorff_alpha_on_hand_computed_cases():
    # Two responses per item: the Kendall distance is the nominal one on "which came first".
    # values 0-first: 3, 1-first: 3 -> D_e = 18/30; D_o = (0 + 0 + 2) / 6 -> alpha = 1 - (1/3)/(3/5) = 4/9
    assert krippendorff_alpha([[[0, 1], [0, 1]], [[1, 0], [1, 0]], [[0, 1], [1, 0]]]) == pytest.approx(4 / 9)
    # D_o = 2/4, D_e = 6/12: no better than chance
    assert krippendorff_alpha([[[0, 1], [0, 1]], [[1, 0], [0, 1]]]) == pytest.approx(0.0)
    # three responses: D_o = 1/3, D_e = (20/3)/12 = 5/9 -> 0.4 (worked out pair by pair in the e2e test's comment)
    assert krippendorff_alpha([[[2, 0, 1], [2, 1, 0]], [[1, 0, 2], [1, 2, 0]]]) == pytest.approx(0.4)
    assert krippendorff_alpha([[[0, 1], [0, 1]], [[1, 0], [1, 0]]]) == pytest.approx(1.0)
    assert krippendorff_alpha([[[0, 1], [0, 1]]]) is None  # no variation at all
    assert krippendorff_alpha([[[0, 1]], [[1, 0]]]) is None  # nobody ranked an item twice


def test_merge_strategies_differ_where_they_should():
    orders = [[0, 1, 2], [0, 1, 2], [2, 1, 0]]  # positions: 0 -> 0,0,2; 1 -> 1,1,1; 2 -> 2,2,0
    assert merge_rankings(orders, "mean") == [0, 1, 2]  # means 2/3, 1, 4/3
    assert merge_rankings(orders, "min") == [0, 2, 1]  # best places 0, 1, 0; ties by mean
    assert merge_rankings(orders, "max") == [1, 0, 2]  # worst places 2, 1, 2
    assert merge_rankings(orders, "majority") == [0, 2, 1]  # first places 2, 0, 1
    assert merge_rankings(orders, "mean", unusable={0}) == [1, 2, 0]


def test_item_status_from_its_annotations(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, per_item=2))
    ranked = lambda who, order, flagged=(): {"annotator": who, "status": "submitted", "ranking": order,  # noqa: E731
                                             "flagged": list(flagged)}
    discarded = {"annotator": "carol", "status": "discarded", "ranking": None, "flagged": [], "reason": "spam"}
    q2 = ITEMS[1]
    assert item_ranking(q2, [ranked("alice", [0, 1, 2])], recipe)["status"] == "pending"
    both = item_ranking(q2, [ranked("alice", [0, 1, 2], [2]), ranked("bob", [1, 2, 0])], recipe)
    assert both["status"] == "ranked" and both["unusable"] == [2] and both["order"] == [1, 0, 2]
    assert item_ranking(q2, [ranked("alice", [0, 1, 2]), discarded], recipe)["status"] == "discarded"
    every_one_flagged = [ranked("alice", [0, 1, 2], [0, 1]), ranked("bob", [2, 1, 0], [2])]
    assert item_ranking(q2, every_one_flagged, recipe)["status"] == "discarded"


# ---- handing items out -------------------------------------------------------------------------------------------

def test_items_go_to_as_many_people_as_asked_and_skips_come_last(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, per_item=1))
    app = AnnotationApp(recipe)
    with open_database(app.path) as db:
        assert load_items(db, recipe)[0] == 3
        add_annotators(db, ["alice", "bob"])
        assert app.next_item(db, "alice")["item"]["id"] == "q1"
        assert app.next_item(db, "alice")["item"]["id"] == "q1"  # a reload keeps the current item
        assert app.next_item(db, "bob")["item"]["id"] == "q2"  # q1 is held for alice
        with pytest.raises(Refused, match="not the one you are annotating"):
            app.answer(db, "bob", {"item_id": "q1", "action": "submit", "ranking": [0, 1, 2]})
        with pytest.raises(Refused, match="ranking: rank every response"):
            app.answer(db, "alice", {"item_id": "q1", "action": "submit", "ranking": [0, 1]})
        assert app.answer(db, "alice", {"item_id": "q1", "action": "skip"})["item"]["id"] == "q3"
        after = app.answer(db, "alice", {"item_id": "q3", "action": "submit", "ranking": [1, 0]})
        assert after["item"]["id"] == "q1"  # the skipped item, back once nothing else is open (q2 is bob's)
        assert after["progress"] == {"done": 1, "skipped": 0, "left": 1, "items": 3, "complete": 1}
        # the responses file grows: new items append, the annotated ones stay as they were
        rows = ITEMS + [item("q4", "four", "vier")]
        (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert load_items(db, recipe)[0] == 4
        assert [r[0] for r in db.execute("SELECT id FROM items ORDER BY position")] == ["q1", "q2", "q3", "q4"]


def test_the_quota_holds_under_idle_drafts_and_revocations_and_sessions_expire(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, per_item=1))
    app = AnnotationApp(recipe)
    hour_ago = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat(timespec="seconds")
    with open_database(app.path) as db:
        load_items(db, recipe)
        add_annotators(db, ["alice", "bob", "carol"])
        assert app.next_item(db, "alice")["item"]["id"] == "q1"
        with db:  # alice leaves q1 open longer than the hold: it goes to bob, who ranks it
            db.execute("UPDATE annotations SET updated = ? WHERE annotator = 'alice'", (hour_ago,))
        assert app.next_item(db, "bob")["item"]["id"] == "q1"
        app.answer(db, "bob", {"item_id": "q1", "action": "submit", "ranking": [0, 1, 2]})
        with pytest.raises(Refused, match="went to others while it was left open") as refused:
            app.answer(db, "alice", {"item_id": "q1", "action": "submit", "ranking": [2, 1, 0]})
        assert refused.value.status == 409
        assert db.execute("SELECT COUNT(*) FROM annotations WHERE item_id = 'q1' AND status = 'submitted'"
                          ).fetchone()[0] == 1  # the quota of one, not two
        assert app.next_item(db, "alice")["item"]["id"] == "q3"  # q2 is bob's now
        revoke_annotators(db, ["alice"])  # her held item goes back at once
        assert app.next_item(db, "carol")["item"]["id"] == "q3"
        _, session = app.sign_in(db, add_annotators(db, ["carol"])["carol"])  # a fresh token
        assert app.annotator(db, session) == "carol"
        with db:
            db.execute("UPDATE sessions SET created = ?", ((datetime.now(timezone.utc) - timedelta(
                hours=recipe.session_hours + 1)).isoformat(timespec="seconds"),))
        with pytest.raises(Refused, match="session has expired"):
            app.annotator(db, session)
        with pytest.raises(Refused, match="sign in with your annotator token"):  # and it is gone
            app.annotator(db, session)


def test_the_browser_sees_responses_only_by_their_place_in_a_keyed_order(tmp_path):
    """Blinding: the page gets places 0..n-1 in each annotator's own order, never the responses' indices (index 0
    is the greedy response of every item); the order comes from the database's secret, and rankings of places are
    stored as rankings of the responses."""
    names = [f"annotator{i}" for i in range(8)]
    orders = []
    for copy in ("a", "b"):  # two databases: two secrets
        (tmp_path / copy).mkdir()
        recipe = load_recipe(write_recipe(tmp_path / copy, per_item=8))
        app = AnnotationApp(recipe)
        with open_database(app.path) as db:
            load_items(db, recipe)
            add_annotators(db, names)
            contents = [r["content"] for r in ITEMS[0]["responses"]]
            seen = {}
            for name in names:
                shown = app.next_item(db, name)["item"]
                assert shown["id"] == "q1" and [r["index"] for r in shown["responses"]] == [0, 1, 2]
                seen[name] = [contents.index(r["content"]) for r in shown["responses"]]
                assert sorted(seen[name]) == [0, 1, 2]
            orders.append(seen)
            # a ranking of places is stored as a ranking of the responses they show
            app.answer(db, names[0], {"item_id": "q1", "action": "submit", "ranking": [2, 0], "flagged": [1]})
            stored = db.execute("SELECT ranking, flagged FROM annotations WHERE annotator = ?", (names[0],)).fetchone()
            order = seen[names[0]]
            assert json.loads(stored[0]) == [order[2], order[0], order[1]] and json.loads(stored[1]) == [order[1]]
    assert len({tuple(o) for o in orders[0].values()}) > 1  # annotators see different orders
    assert orders[0] != orders[1]  # and another database's secret gives other orders


# ---- the whole app in a browser ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen2_align.cli", *args], capture_output=True, text=True, timeout=300)


def start_server(recipe: Path, log: Path) -> subprocess.Popen:
    """`qwen2-align annotate` serving the people's app, its output in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "qwen2_align.cli", "annotate", "--recipe", str(recipe)],
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited: {log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"the server did not start: {log.read_text()}")


def card(page, index: int):
    """The card of the current item's response `index` (of ITEMS), found by its text: the page knows responses only
    by their place in this annotator's order."""
    item_id = current_item(page)
    content = next(r for r in ITEMS if r["id"] == item_id)["responses"][index]["content"]
    return page.locator(".response").filter(has=page.locator(".text").get_by_text(content, exact=True))


def sign_in(page, url: str, token: str) -> None:
    page.goto(url)
    page.fill("#token", token)
    page.click("#sign-in")
    page.wait_for_selector("#item-view:not([hidden])")


def current_item(page) -> str | None:
    return page.locator("#item-view").get_attribute("data-item")


def shown(page, item_id: str) -> None:
    """Wait until the page shows this item."""
    page.locator(f'#item-view[data-item="{item_id}"]:not([hidden])').wait_for()


def test_people_rank_in_chromium_and_the_export_matches_the_clicks(tmp_path):
    """Two annotators in two browser sessions; the server is killed (-9) before the export."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    assert os.path.exists(CHROMIUM), "Debian's chromium is missing: `make install` installs it (as root)"
    port = free_port()
    rows = ITEMS + [{"id": "broken", "prompt": "not a conversation", "responses": []}]
    recipe = write_recipe(tmp_path, per_item=2, port=port, rows=rows)
    made = cli("annotators", "--recipe", str(recipe), "--add", "alice", "--add", "bob")
    assert made.returncode == 0, made.stderr
    tokens = dict(line.split("\t") for line in made.stdout.splitlines() if "\t" in line)
    log = tmp_path / "server.log"
    server = start_server(recipe, log)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(port, server, log)
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            alice = browser.new_page()
            alice.goto(url)
            alice.fill("#token", "not-a-token")
            alice.click("#sign-in")
            expect = playwright.expect  # waits for the page to catch up, unlike a plain assert
            expect(alice.locator("#message")).to_have_text("that token is not valid")
            assert alice.locator("#sign-in-view").is_visible() and not alice.locator("#item-view").is_visible()

            sign_in(alice, url, tokens["alice"])
            assert current_item(alice) == "q1"
            # markup in a response is text: shown verbatim, no element made, no script run
            assert card(alice, 2).locator(".text").inner_text() == "<script>window.__xss = 1</script>"
            assert card(alice, 1).locator(".text").inner_text() == '<img src=x onerror="window.__xss = 2">'
            assert alice.locator("#responses script, #responses img").count() == 0
            if path := os.environ.get("QWEN2_ALIGN_SCREENSHOT"):
                card(alice, 2).click()
                alice.screenshot(path=path, full_page=True)
                card(alice, 2).click()
            # q1 by keyboard: the numbers shown on the cards, best first, then Enter
            for index in (2, 0, 1):
                alice.keyboard.press(card(alice, index).get_attribute("data-key"))
            expect(card(alice, 0).locator(".rank")).to_have_text("rank 2")
            alice.keyboard.press("Enter")
            shown(alice, "q2")
            # q2 by mouse, with response 2 marked unusable
            card(alice, 2).locator(".flag").click()
            assert alice.locator("#submit").is_disabled()
            card(alice, 1).click()
            card(alice, 0).click()
            alice.click("#submit")
            shown(alice, "q3")
            alice.keyboard.press("s")  # skipped: with nothing else left it comes straight back
            expect(alice.locator("#message")).to_have_text("Skipped.")
            assert current_item(alice) == "q3"
            alice.fill("#discard-reason", "the question is unclear")
            alice.click("#discard")
            alice.wait_for_selector("#done-view:not([hidden])")
            expect(alice.locator("#progress")).to_contain_text("3 done, 0 skipped, 0 left for you")
            assert alice.evaluate("window.__xss") is None

            bob = browser.new_context().new_page()
            sign_in(bob, url, tokens["bob"])
            assert current_item(bob) == "q1"
            for index in (2, 1, 0):
                card(bob, index).click()
            bob.click("#submit")
            shown(bob, "q2")
            for index in (1, 2, 0):
                bob.keyboard.press(card(bob, index).get_attribute("data-key"))
            bob.keyboard.press("Enter")
            shown(bob, "q3")
            card(bob, 0).click()
            card(bob, 1).click()
            bob.click("#submit")
            bob.wait_for_selector("#done-view:not([hidden])")
            browser.close()
    finally:
        server.kill()  # SIGKILL: the export must still see every answer
        server.wait()

    database = tmp_path / "run" / "annotations.sqlite"
    with sqlite3.connect(database) as db:
        stored = dict(((who, item_id), (status, ranking)) for item_id, who, status, ranking in
                      db.execute("SELECT item_id, annotator, status, ranking FROM annotations"))
    assert stored[("alice", "q1")] == ("submitted", "[2, 0, 1]")
    assert stored[("bob", "q1")] == ("submitted", "[2, 1, 0]")  # each annotator's ranking kept apart
    assert stored[("alice", "q2")] == ("submitted", "[1, 0, 2]")
    assert stored[("alice", "q3")] == ("discarded", None)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert not any(token.encode() in path.read_bytes() for token in tokens.values()), path

    exported = cli("annotate", "export", "--recipe", str(recipe))
    assert exported.returncode == 0, exported.stderr
    run_dir = tmp_path / "run"
    read = lambda name: [json.loads(line) for line in (run_dir / f"{name}.jsonl").read_text().splitlines()]  # noqa
    rankings = {r["id"]: r for r in read("rankings")}
    assert {k: (r["status"], r["order"]) for k, r in rankings.items()} == {
        "q1": ("ranked", [2, 0, 1]),  # mean positions 0, 1.5, 1.5: the tie keeps the responses' order
        "q2": ("ranked", [1, 0, 2]),  # 2 marked unusable by alice, one of two rankers: goes last
        "q3": ("discarded", None)}  # one discard against one ranking
    demonstrations = {r["id"]: r for r in read("demonstrations")}
    assert set(demonstrations) == {"q1-d", "q2-d"}
    assert demonstrations["q1-d"]["messages"][-1]["content"] == "<script>window.__xss = 1</script>"
    assert demonstrations["q2-d"]["messages"][-1]["content"] == "second: beta"
    lineage = demonstrations["q1-d"]["meta"]["lineage"]
    assert lineage["judge"] == {"kind": "people", "merge": "mean", "annotators": ["alice", "bob"]}
    assert lineage["chosen"] == {"index": 2, "model": "model-0", "strategy": "sampled", "score": None}
    preferences = {r["id"]: (r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in read("preferences")}
    assert preferences == {"q1-p0": ("<script>window.__xss = 1</script>", '<img src=x onerror="window.__xss = 2">'),
                           "q2-p0": ("second: beta", "second: gamma")}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["counts"]["rows_in"] == 4 and manifest["counts"]["quarantined_by_stage"] == 1
    people = manifest["annotate"]
    assert people["items"] == {"ranked": 2, "discarded": 1, "pending": 0}
    # q1: alice [2,0,1] vs bob [2,1,0]; q2: [1,0,2] vs [1,2,0]: alpha 0.4 (test_krippendorff_alpha_...)
    assert people["agreement"]["krippendorff_alpha_kendall"] == pytest.approx(0.4)
    assert people["by_annotator"] == {"alice": {"submitted": 2, "discarded": 1}, "bob": {"submitted": 3, "discarded": 0}}
    assert not any(token in log.read_text() for token in tokens.values())


# ---- hostile clients, through real HTTP -------------------------------------------------------------------------

def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes as they are and read the answer: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _post(port: int, path: str, body: bytes, cookie: str = "", length: str | None = None) -> tuple[int, bytes]:
    headers = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n"
               + (f"Cookie: {cookie}\r\n" if cookie else "") + "\r\n")
    return _raw(port, headers.encode() + body)


def test_bad_clients_get_one_json_answer_and_store_nothing(tmp_path):
    """Odd types, oversized and malformed bodies and control characters in the path: each gets a 4xx JSON answer,
    the ranking is not stored, the server lives on, and the log holds the path escaped."""
    port = free_port()
    recipe = write_recipe(tmp_path, per_item=1, port=port)
    made = cli("annotators", "--recipe", str(recipe), "--add", "alice")
    token = dict(line.split("\t") for line in made.stdout.splitlines() if "\t" in line)["alice"]
    log = tmp_path / "server.log"
    server = start_server(recipe, log)
    try:
        wait_for(port, server, log)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # the session cookie of a sign-in
            body = json.dumps({"token": token}).encode()
            s.sendall(b"POST /api/sign-in HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        cookie = answer.split(b"Set-Cookie: ", 1)[1].split(b";", 1)[0].decode()
        status, body = _raw(port, f"GET /api/next HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n"
                                  "Connection: close\r\n\r\n".encode())
        assert status == 405  # a GET changes nothing: it claims no item
        assert sqlite3.connect(tmp_path / "run" / "annotations.sqlite").execute(
            "SELECT COUNT(*) FROM annotations").fetchone()[0] == 0
        # another site, or another port of this host, cannot act with the annotator's cookie
        own = f"Host: 127.0.0.1:{port}\r\nCookie: {cookie}\r\nContent-Type: application/json\r\n"
        for sender in (f"Origin: http://127.0.0.1:{port + 1}", "Origin: http://evil.example",
                       "Sec-Fetch-Site: same-site", "Sec-Fetch-Site: cross-site"):
            status, _ = _raw(port, f"POST /api/next HTTP/1.1\r\n{own}{sender}\r\nContent-Length: 2\r\n"
                                   "Connection: close\r\n\r\n{}".encode())
            assert status == 403, sender
        status, body = _raw(port, f"POST /api/next HTTP/1.1\r\n{own}Origin: http://127.0.0.1:{port}\r\n"
                                  "Sec-Fetch-Site: same-origin\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
                                  .encode())
        assert status == 200 and json.loads(body)["item"]["id"] == "q1"

        def answer_with(payload: dict) -> tuple[int, dict]:
            status, body = _post(port, "/api/answer", json.dumps(payload).encode(), cookie)
            return status, json.loads(body)

        for ranking in ([2, True, 0], [2.0, 1, 0], [2, 1, "0"]):  # True == 1 and 2.0 == 2 in Python
            status, payload = answer_with({"item_id": "q1", "action": "submit", "ranking": ranking})
            assert status == 400 and payload["error"].startswith("ranking:"), (ranking, payload)
        status, payload = answer_with({"item_id": "q1", "action": "submit", "ranking": [0, 1, 2], "flagged": [False]})
        assert status == 400 and payload["error"].startswith("flagged:")
        status, payload = answer_with({"item_id": {}, "action": "skip"})
        assert status == 400 and payload["error"].startswith("item_id:")
        status, payload = answer_with({"item_id": "q1", "action": "discard", "reason": {"x": 1}})
        assert status == 400 and payload["error"].startswith("reason:")
        deep = b"[" * 30_000 + b"]" * 30_000  # deeper than the parser recurses, within the size limit
        status, body = _post(port, "/api/answer", deep, cookie)
        assert status == 400 and json.loads(body) == {"error": "the body must be a JSON object"}
        # a body too large is refused from its Content-Length, before it is sent
        status, body = _post(port, "/api/sign-in", b"", length=str(10 ** 12))
        assert status == 413 and json.loads(body)["error"] == "the body is too large"
        status, body = _raw(port, b"POST /api/sign-in HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Connection: close\r\n\r\n")
        assert status == 411
        status, _ = _raw(port, b"GET /nothing\x1b[31m\rforged HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status in (400, 404)
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
    with closing(sqlite3.connect(tmp_path / "run" / "annotations.sqlite")) as db:
        assert db.execute("SELECT COUNT(*) FROM annotations WHERE status != 'draft'").fetchone()[0] == 0
    logged = log.read_text()
    assert "\x1b" not in logged and "\\x1b[31m" in logged and "\\x0dforged" in logged


def test_silent_connections_time_out_and_cannot_take_every_thread(tmp_path):
    """Half-sent requests up to the cap hold their threads only until the timeout; one more connection beyond the
    cap is answered 503 at once; after the timeout the server answers again."""
    port = free_port()
    recipe = write_recipe(tmp_path, per_item=1, port=port)
    recipe.write_text(recipe.read_text() + "request_timeout_s: 2\nmax_connections: 3\n")
    log = tmp_path / "server.log"
    server = start_server(recipe, log)
    try:
        wait_for(port, server, log)
        time.sleep(0.5)  # wait_for's probe connection has gone
        silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(3)]
        for s in silent:
            s.sendall(b"GET / HTTP/1.1\r\n")  # and nothing more
        time.sleep(0.5)
        status, body = _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 503 and json.loads(body) == {"error": "the server is busy"}
        started = time.monotonic()
        for s in silent:  # each is closed by the server at its timeout (the client would wait 30 s)
            while s.recv(65536):
                pass
            s.close()
        assert time.monotonic() - started < 10
        status, _ = _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
