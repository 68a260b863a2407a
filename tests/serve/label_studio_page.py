"""What a labeler sees on Label Studio's labeling page of one task, in headless Chromium.

Run by tests/serve/test_serve_label_studio.py with Label Studio's virtual environment (Playwright
is locked there, requirements/label-studio.txt) and the system's Chromium:

    .venv-ls/bin/python tests/serve/label_studio_page.py URL PROJECT TASK SHOT.png \\
        --email E --password P [--submit]

Logs in, opens the task, waits until the labeling page has loaded its regions, saves a
screenshot, and prints one JSON object: ``image`` (the task image's URL and the size the browser
decoded, 0 when it did not load), ``regions`` (each drawn region: its kind and the result it
would save), ``errors`` (Label Studio's error messages on the page), ``failed`` (requests of the
page answered 4xx/5xx) and, with ``--submit``, ``submitted``: the HTTP status of the annotation Submit saved.
"""

from __future__ import annotations

import argparse
import json

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
LOADED_S = 60  # the labeling page has its regions by then

# The page's state, read from Label Studio's editor (window.Htx: its store, set on load)
READ = """(src) => {
  const store = window.Htx.annotationStore;
  const annotation = store.selected;
  const img = [...document.querySelectorAll('img')].find((i) => i.src === src);
  const entity = store.names.get('image')?.currentImageEntity;
  return {
    image: {src, width: img ? img.naturalWidth : 0, height: img ? img.naturalHeight : 0},
    regions: annotation.regions.map((r) => ({kind: r.type, id: r.cleanId})),
    results: annotation.serializeAnnotation(),
    errors: [
      ...(store.validation || []).map((e) => String(e.error || e.detail || e)),
      ...[...document.querySelectorAll('.lsf-errors')].map((e) => e.innerText),
      ...(entity && entity.error ? [String(entity.error)] : []),
    ],
  };
}"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("project", type=int)
    p.add_argument("task", type=int)
    p.add_argument("screenshot")
    p.add_argument("--image", required=True, help="the task's image URL as the page loads it")
    p.add_argument("--email", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--submit", action="store_true", help="press Submit, as a labeler accepting")
    args = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        failed: list[tuple[int, str]] = []
        page.on("response", lambda r: failed.append((r.status, r.url)) if r.status >= 400 else 0)
        page.goto(args.url + "/user/login/")
        page.fill("input[name=email]", args.email)
        page.fill("input[name=password]", args.password)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{args.url}/projects/{args.project}/data?task={args.task}")
        page.wait_for_function(
            "() => window.Htx?.annotationStore?.selected?.regions?.length > 0",
            timeout=LOADED_S * 1000,
        )
        page.wait_for_function(
            "(src) => [...document.querySelectorAll('img')].some((i) => i.src === src && "
            "i.complete)",
            arg=args.image,
            timeout=LOADED_S * 1000,
        )
        page.wait_for_load_state("networkidle")
        seen = page.evaluate(READ, args.image)
        page.screenshot(path=args.screenshot)
        if args.submit:
            with page.expect_response(
                lambda r: r.request.method == "POST" and "/annotations" in r.url,
                timeout=LOADED_S * 1000,
            ) as saved:
                page.get_by_role("button", name="Submit").click()
            seen["submitted"] = saved.value.status
            page.wait_for_load_state("networkidle")
        seen["failed"] = failed
        browser.close()
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
