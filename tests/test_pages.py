"""The clinicians' pages for real: `medloop serve` on 127.0.0.1 serving the session's trained
tabular champion (``served_workspace``, with a feedback store of this module's own), driven by
Debian's chromium through Selenium, one browser for the whole module. The tests run in order and
build on each other's labels, as a clinic's day would: clinicians work through the worklist, two
disagree, a reviewer resolves it, monitoring shows it, an admin reads the access log.

Screenshots of every page go to ``$MEDLOOP_TEST_ARTIFACTS`` (default: a temporary folder).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import httpx
import pytest

import pandas as pd

from conftest import load, serving_settings
from test_serving import start_service, stop
from tests_support import breast_cancer_frame, sign_in_to_pages

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
CASES = 4


@pytest.fixture(scope="module")
def world(served_workspace, tmp_path_factory):
    """The service on its own store with CASES predictions made through the API; yields
    ``{"base", "tokens", "store", "params", "cases"}``."""
    layout = served_workspace["layout"]
    folder = tmp_path_factory.mktemp("pages")
    store = folder / "pages-store.db"
    with serving_settings(layout, store_url=f"sqlite:///{store}", session_idle_minutes=30):
        process, base = start_service(layout)
    try:
        params = load(layout)
        tokens = served_workspace["tokens"]
        # real measurements of the built-in data set (both classes), the model's features only
        frame = breast_cancer_frame(40, seed=11).dropna(subset=list(params.tabular.features))
        chosen = pd.concat([frame[frame.diagnosis == "benign"].head(CASES // 2),
                            frame[frame.diagnosis != "benign"].head(CASES - CASES // 2)])
        rows = [{name: float(row[name]) for name in params.tabular.features} for _, row in chosen.iterrows()]
        answer = httpx.post(f"{base}/predict", json={"instances": rows}, timeout=60,
                            headers={"Authorization": f"Bearer {tokens['clinician']}"})
        assert answer.status_code == 200, answer.text
        yield {"base": base, "tokens": tokens, "store": store, "params": params,
               "cases": [item["prediction_id"] for item in answer.json()["predictions"]]}
    finally:
        stop(process)


@pytest.fixture(scope="module")
def browser():
    if not CHROMEDRIVER.exists() or not CHROMIUM.exists():
        pytest.fail(f"the browser tests need {CHROMIUM} and {CHROMEDRIVER}: `make browsers` installs them "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                     "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("MEDLOOP_TEST_ARTIFACTS") or tmp_path_factory.mktemp("page-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ------------------------------------------------------------------------------------------------


def wait_for(driver, css: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 30).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))


def find(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def press(driver, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(keys).perform()


def navigated(driver, action) -> None:
    """Do ``action`` and wait until the browser shows a new, loaded document (a mark left on the
    old one's window is gone). Asking mid-navigation may fail; it is asked again."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.medloopOldPage = true;")
    action()
    WebDriverWait(driver, 60, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return !window.medloopOldPage && document.readyState === 'complete'"))
    wait_for(driver, "main")


def sign_in(driver, base: str, token: str) -> None:
    driver.get(f"{base}/pages/signin")
    find(driver, "#token").send_keys(token)
    navigated(driver, lambda: find(driver, "#signin").click())


def sign_out(driver) -> None:
    navigated(driver, lambda: find(driver, "#signout").click())


def shot(driver, artifacts: Path, name: str) -> None:
    driver.set_window_size(1400, max(1000, driver.execute_script("return document.body.scrollHeight")))
    driver.save_screenshot(str(artifacts / f"{name}.png"))
    driver.set_window_size(1400, 1000)


def feedback_rows(store: Path) -> list[tuple]:
    with sqlite3.connect(store) as connection:
        return connection.execute("SELECT prediction_id, label, reviewer_id, comment FROM feedback ORDER BY id").fetchall()


# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sign_in_and_out(world, browser, artifacts):
    base = world["base"]
    browser.get(f"{base}/pages/worklist")
    wait_for(browser, "#token")
    assert browser.current_url.startswith(f"{base}/pages/signin")  # not signed in: sent to sign in
    shot(browser, artifacts, "01-signin")
    find(browser, "#token").send_keys("not-a-token")
    navigated(browser, lambda: find(browser, "#signin").click())
    assert "not known" in find(browser, "#problem").text

    find(browser, "#token").send_keys(world["tokens"]["clinician"])
    navigated(browser, lambda: find(browser, "#signin").click())
    assert browser.current_url.startswith(f"{base}/pages/worklist")  # back where they were going
    assert "dr-clinician (clinician)" in find(browser, ".who").text
    sign_out(browser)
    browser.get(f"{base}/pages/worklist")
    wait_for(browser, "#token")  # the session ended with the sign-out


@pytest.mark.slow
def test_clinician_works_through_the_worklist_by_keyboard(world, browser, artifacts):
    base, classes = world["base"], world["params"].model.classes
    sign_in(browser, base, world["tokens"]["clinician"])
    assert find(browser, "#left strong").text == str(CASES)
    shot(browser, artifacts, "02-worklist")
    press(browser, "j")  # the first case
    navigated(browser, lambda: press(browser, "\ue007"))  # Enter
    wait_for(browser, "#feedback")
    shot(browser, artifacts, "03-case")
    assert find(browser, "#features tbody tr") is not None
    corrected = None
    for position in range(CASES):
        case_id = browser.current_url.split("/cases/")[1].split("?")[0]
        decision = find(browser, "#decision").text
        if position == 1:  # correct this one: another class, with a comment, by its key
            other = next(label for label in classes if label != decision)
            find(browser, "#comment").send_keys("margin looks irregular")
            find(browser, "main").click()  # leave the comment field: keys act again
            navigated(browser, lambda: press(browser, str(classes.index(other) + 1)))
            corrected = (case_id, other)
        else:
            navigated(browser, lambda: press(browser, "c"))
    assert browser.current_url.startswith(f"{base}/pages/worklist")  # all done: back to the list
    assert find(browser, "#empty")
    rows = [row for row in feedback_rows(world["store"]) if row[2] == "dr-clinician"]
    assert len(rows) == CASES and {row[0] for row in rows} == set(world["cases"])
    assert [(row[0], row[1], row[3]) for row in rows if row[3]] == [(*corrected, "margin looks irregular")]
    sign_out(browser)


@pytest.mark.slow
def test_two_clinicians_disagree_and_a_reviewer_resolves_it(world, browser, artifacts):
    base, classes = world["base"], world["params"].model.classes
    first = world["cases"][0]
    label = next(row[1] for row in feedback_rows(world["store"]) if row[0] == first and row[2] == "dr-clinician")
    other = next(c for c in classes if c != label)
    sign_in(browser, base, world["tokens"]["clinician2"])
    browser.get(f"{base}/pages/cases/{first}")
    wait_for(browser, "#feedback")
    navigated(browser, lambda: press(browser, str(classes.index(other) + 1)))
    sign_out(browser)

    sign_in(browser, base, world["tokens"]["reviewer"])
    browser.get(f"{base}/pages/adjudication")
    section = wait_for(browser, "section.adjudication")
    assert "dr-clinician" in section.text and "dr-clinician2" in section.text
    shot(browser, artifacts, "04-adjudication")
    find(browser, f"section.adjudication input[value='{other}']").click()
    find(browser, "section.adjudication textarea").send_keys("second reading agrees with dr-clinician2")
    navigated(browser, lambda: find(browser, "section.adjudication button[type=submit]").click())
    assert find(browser, "#empty")
    browser.get(f"{base}/pages/cases/{first}")
    assert find(browser, "#confirmed").text == other
    assert "resolved it as" in find(browser, "#history").text


@pytest.mark.slow
def test_monitoring_shows_its_plots(world, browser, artifacts):
    browser.get(f"{world['base']}/pages/monitoring")  # still the reviewer
    for figure in ("sensitivity", "specificity", "agreement"):
        chart = wait_for(browser, f"#chart-{figure} svg")
        assert chart.size["width"] > 100 and chart.size["height"] > 100
    # v1's agreement: CASES confirmed labels (three agreed cases of dr-clinician, one adjudicated)
    assert f"/{CASES}" in find(browser, "#versions tbody").text
    assert find(browser, "#policy").text
    shot(browser, artifacts, "05-monitoring")
    sign_out(browser)


@pytest.mark.slow
def test_a_clinician_cannot_open_reviewer_or_admin_pages(world, browser, artifacts):
    sign_in(browser, world["base"], world["tokens"]["clinician"])
    assert "Adjudication" not in find(browser, "header nav").text
    for page in ("adjudication", "monitoring", "models", "access-log"):
        browser.get(f"{world['base']}/pages/{page}")
        assert "may not open this page" in wait_for(browser, "#problem").text
    shot(browser, artifacts, "08-refused")
    sign_out(browser)


@pytest.mark.slow
def test_the_admin_sees_models_and_the_access_log(world, browser, artifacts):
    sign_in(browser, world["base"], world["tokens"]["admin"])
    browser.get(f"{world['base']}/pages/models")
    assert "champion" in wait_for(browser, "#versions").text
    shot(browser, artifacts, "06-models")
    browser.get(f"{world['base']}/pages/models/1/card")
    assert f"# Model card: {world['params'].model.name}" in wait_for(browser, "#model-card").text
    browser.get(f"{world['base']}/pages/access-log")
    log = wait_for(browser, "#access-log").text
    shot(browser, artifacts, "07-access-log")
    with sqlite3.connect(world["store"]) as connection:
        views = connection.execute("SELECT viewer, prediction_id, page FROM access_log").fetchall()
    for case_id in world["cases"]:  # every case dr-clinician labelled was viewed, and logged
        assert ("dr-clinician", case_id, "case") in views
    assert ("dr-clinician2", world["cases"][0], "case") in views
    assert ("dr-reviewer", world["cases"][0], "adjudication") in views
    assert "dr-clinician2" in log
    sign_out(browser)


# ------------------------------------------------------------------------------------------------
# without the browser: cookies, CSRF, headers, the append-only access log


def signed_in_client(world, role: str) -> tuple[httpx.Client, httpx.Response]:
    """A client signed in as ``role`` through the sign-in form, and the sign-in's answer."""
    client = httpx.Client(base_url=world["base"], timeout=30)
    answer = sign_in_to_pages(client, world["tokens"][role])
    assert answer.status_code == 303, answer.text
    return client, answer


@pytest.mark.slow
def test_the_session_cookie_and_headers(world):
    client, signed = signed_in_client(world, "clinician")
    [cookie] = [value for name, value in signed.headers.multi_items()
                if name == "set-cookie" and value.startswith("medloop_session=")]
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in attributes and "samesite=strict" in attributes
    assert "secure" not in attributes  # plain HTTP here; Secure when served over TLS
    page = client.get("/pages/worklist")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "<script>" not in page.text and " onclick=" not in page.text  # no inline script to allow


@pytest.mark.slow
def test_a_form_without_its_csrf_token_is_refused(world):
    client, _ = signed_in_client(world, "clinician")
    case_id = world["cases"][2]
    before = len(feedback_rows(world["store"]))
    refused = client.post(f"/pages/cases/{case_id}/feedback", data={"label": world["params"].model.classes[0]})
    assert refused.status_code == 403 and "CSRF" in refused.text
    for guess in ("guessed", "é" * 43):  # not ASCII either: refused, not a server error
        wrong = client.post(f"/pages/cases/{case_id}/feedback", data={"label": world["params"].model.classes[0],
                                                                       "csrf": guess})
        assert wrong.status_code == 403
    assert len(feedback_rows(world["store"])) == before  # nothing stored
    anonymous = httpx.post(f"{world['base']}/pages/signin", data={"token": world["tokens"]["admin"]})
    assert anonymous.status_code == 403  # the sign-in form too needs its token


@pytest.mark.slow
def test_the_access_log_is_append_only(world):
    with sqlite3.connect(world["store"]) as connection:
        assert connection.execute("SELECT COUNT(*) FROM access_log").fetchone()[0] > 0
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            connection.execute("UPDATE access_log SET viewer = 'someone else'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            connection.execute("DELETE FROM access_log")


def test_an_idle_session_ends():
    from serving.auth import Caller
    from serving.pages import Sessions

    sessions = Sessions(idle_seconds=60)
    session_id = sessions.start(Caller("dr-a", "clinician"))
    assert sessions.get(session_id).caller.name == "dr-a"
    sessions.by_id[session_id].last_seen -= 61  # a minute and a second without a request
    assert sessions.get(session_id) is None and session_id not in sessions.by_id


def test_a_dicom_image_is_shown_at_full_resolution_through_its_window(tmp_path):
    import io

    import numpy as np
    import pydicom
    from PIL import Image

    from serving.pages import PageRefusal, image_png
    from tests_support import chest_dicom

    data = chest_dicom("CT_small.dcm")
    (tmp_path / "case.dcm").write_bytes(data)
    dataset = pydicom.dcmread(io.BytesIO(data))
    case = {"input_metadata": {"format": "dicom", "file": "case.dcm"}}
    full = np.asarray(Image.open(io.BytesIO(image_png(tmp_path, case, None, None))))
    assert full.shape == (dataset.Rows, dataset.Columns)  # full resolution, grey levels
    values = dataset.pixel_array * float(dataset.get("RescaleSlope", 1)) + float(dataset.get("RescaleIntercept", 0))
    centre = float(np.median(values))
    narrow = np.asarray(Image.open(io.BytesIO(image_png(tmp_path, case, centre, 10.0))))
    # a narrow window at the median sends most pixels to black or white
    assert np.isin(narrow, (0, 255)).mean() > 0.8 > np.isin(full, (0, 255)).mean()
    with pytest.raises(PageRefusal, match="not kept"):
        image_png(tmp_path, {"input_metadata": {"format": "png", "file": "absent.png"}}, None, None)


def test_the_worklist_orders_filters_and_counts(tmp_path):
    from pipelines.store.feedback import FeedbackStore

    store = FeedbackStore(f"sqlite:///{tmp_path / 'store.db'}")
    made = {}
    for name, version, p_malignant in (("sure", "1", 0.99), ("unsure", "1", 0.52), ("older", "2", 0.10),
                                       ("borderline", "2", 0.45)):
        decision = "malignant" if p_malignant >= 0.5 else "benign"
        made[name] = store.record_prediction(
            model_name="m", model_version=version, input_sha256=name * 4, modality="tabular",
            probabilities={"benign": 1 - p_malignant, "malignant": p_malignant}, decision=decision,
            operating_threshold=0.5, requested_by="api")
    store.record_prediction(model_name="other", model_version="1", input_sha256="x", modality="tabular",
                            probabilities={"benign": 0.5, "malignant": 0.5}, decision="benign",
                            operating_threshold=0.5, requested_by="api")
    store.add_feedback(made["sure"], "malignant", "dr-a", "k1")

    cases, left = store.worklist("dr-a", "m", "malignant", order="uncertain")
    assert left == 3  # dr-a labelled "sure"; another model's case is not on this list
    assert [case["id"] for case in cases] == [made["unsure"], made["borderline"], made["older"]]
    cases, left = store.worklist("dr-b", "m", "malignant", model_version="2", decision="benign", limit=1)
    assert left == 2 and len(cases) == 1 and cases[0]["id"] == made["borderline"]  # newest first
    assert store.worklist("dr-a", "m", "malignant", since="2999-01-01") == ([], 0)
    assert store.worklist("dr-a", "m", "malignant", since="2000-01-01")[1] == 3

    store.add_feedback(made["unsure"], "benign", "dr-a", "k2", "looks benign")
    store.add_feedback(made["unsure"], "malignant", "dr-b", "k3")
    history = store.case_history(made["unsure"])
    assert [(row["reviewer_id"], row["label"]) for row in history["feedback"]] == [("dr-a", "benign"),
                                                                                  ("dr-b", "malignant")]
    assert history["confirmed_label"] is None and history["adjudication"]["resolution"] is None
    store.resolve(history["adjudication"]["id"], "malignant", "dr-r", "second reading")
    assert store.case_history(made["unsure"])["confirmed_label"] == "malignant"
    assert store.case_history(made["sure"])["confirmed_label"] == "malignant"  # one label, agreed

    store.record_view(made["sure"], "dr-a", "clinician", "case")
    store.record_view(made["unsure"], "dr-r", "reviewer", "adjudication")
    assert [(view["viewer"], view["page"]) for view in store.access_log()] == [("dr-r", "adjudication"),
                                                                               ("dr-a", "case")]
    assert [view["viewer"] for view in store.access_log(prediction_id=made["sure"])] == ["dr-a"]
    store.close()
