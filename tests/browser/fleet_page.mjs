// Drives headless Chromium through the fleet page for tests/tests/fleet_page.rs.
// The Rust test owns the fleet and its faults; this script owns the browser.
// They talk in lines: the script prints `STEP <name> <details>` when the page
// shows what a step waits for and reads the next command (`cut`, `heal`,
// `silence`, `done`) from stdin. Any failure prints `FAIL <why>` and exits 1.
//
// Environment: FLEET_URL (https://127.0.0.1:PORT/fleet), FLEET_TOKEN (an
// operator token), CHROMIUM (the executable), SCREENSHOT (a PNG to write
// while blr is cut off, and beside it `-phone.png` at a phone's width;
// optional), STEP_TIMEOUT_MS (default 15000).
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const url = process.env.FLEET_URL;
const token = process.env.FLEET_TOKEN;
const timeout = Number(process.env.STEP_TIMEOUT_MS || 15000);
const origin = new URL(url).origin;

const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function command() {
  const { value, done } = await lines.next();
  if (done) throw new Error("the test closed stdin");
  return value.trim();
}
// Waits for `selector`; a timeout names it.
async function shows(page, selector, options) {
  try {
    return await page.waitForSelector(selector, options);
  } catch (e) {
    throw new Error(`the page never showed ${selector}: ${e.message.split("\n")[0]}`);
  }
}
function step(name, details = "") {
  process.stdout.write(`STEP ${name} ${details}\n`);
}

// Loopback only: no name resolves (so nothing on the internet can be
// reached) and Chromium's own background traffic is off.
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--no-pings",
    "--no-first-run",
    "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
  ],
});
let failed = false;
try {
  // The control plane's certificate is the lab CA's, for cp.detour.test.
  const context = await browser.newContext({
    ignoreHTTPSErrors: true,
    viewport: { width: 1280, height: 860 },
    deviceScaleFactor: 1,
    colorScheme: "light",
  });
  const external = [];
  context.on("request", (r) => {
    if (!r.url().startsWith(origin)) external.push(r.url());
  });
  const page = await context.newPage();
  page.setDefaultTimeout(timeout);

  // Without a login: the page sends to the form, the data is a 401.
  await page.goto(url);
  if (!page.url().endsWith("/fleet/login")) throw new Error(`not sent to the login: ${page.url()}`);
  const data = await page.request.get(`${origin}/v1/fleet/view`);
  if (data.status() !== 401) throw new Error(`the data answered ${data.status()} without a login`);
  step("login-required");

  // Log in with the form; the cookie is HttpOnly (script cannot read it).
  await page.fill("#token", token);
  await page.click("button[type=submit]");
  await page.waitForLoadState();
  if (page.url() !== url) {
    const why = await page.locator(".error").allTextContents();
    throw new Error(`login did not lead to the page: at ${page.url()}: ${why.join(" ")}`);
  }
  if (page.url().includes(token)) throw new Error("the token is in the URL");
  const cookies = await context.cookies();
  const session = cookies.find((c) => c.name === "detour_session");
  if (!session || !session.httpOnly || session.sameSite !== "Strict") {
    throw new Error(`session cookie: ${JSON.stringify(session)}`);
  }
  if ((await page.evaluate(() => document.cookie)).includes("detour_session")) {
    throw new Error("the page's script can read the session cookie");
  }
  for (const pop of ["blr", "maa", "del"]) {
    await shows(page, `.pop[data-pop="${pop}"][data-active="direct"][data-stale="false"]`);
  }
  step("all-direct", "blr maa del");

  if ((await command()) !== "cut") throw new Error("expected cut");
  let t0 = Date.now();
  const blr = await shows(page, '.pop[data-pop="blr"][data-active^="via:"]');
  const active = await blr.getAttribute("data-active");
  const reason = await page.textContent('.pop[data-pop="blr"] [data-role="last-switch"]');
  if (!/direct (down|degraded)/.test(reason)) throw new Error(`blr's switch reason: ${reason}`);
  await shows(page, `#switches li[data-pop="blr"]`);
  // An SVG line may have no height, which Playwright calls invisible.
  await shows(page, `#detours line[data-from="blr"][data-via="${active.slice(4)}"]`, { state: "attached" });
  step("blr-detoured", `${Date.now() - t0}ms ${active} ${JSON.stringify(reason)}`);
  if (process.env.SCREENSHOT) {
    // One more report, so the sparkline shows the cut.
    await page.waitForTimeout(2500);
    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
    // And as a phone shows it (the same page at 390 px).
    const phone = process.env.SCREENSHOT.replace(/\.png$/, "-phone.png");
    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForTimeout(300);
    await page.screenshot({ path: phone, fullPage: false });
    await page.setViewportSize({ width: 1280, height: 860 });
    step("screenshot", `${process.env.SCREENSHOT} ${phone}`);
  }

  if ((await command()) !== "heal") throw new Error("expected heal");
  t0 = Date.now();
  await shows(page, '.pop[data-pop="blr"][data-active="direct"]', { timeout: timeout * 4 });
  step("blr-direct", `${Date.now() - t0}ms`);

  if ((await command()) !== "silence") throw new Error("expected silence");
  t0 = Date.now();
  await shows(page, '.pop[data-pop="del"][data-stale="true"]');
  const meta = await page.textContent('.pop[data-pop="del"] [data-role="age"]');
  if (!meta.includes("no report for")) throw new Error(`del's age line: ${meta}`);
  step("del-stale", `${Date.now() - t0}ms ${JSON.stringify(meta)}`);

  if (external.length) throw new Error(`requests beyond the control plane: ${external.join(", ")}`);
  if ((await command()) !== "done") throw new Error("expected done");
} catch (e) {
  failed = true;
  process.stdout.write(`FAIL ${String(e && e.message ? e.message : e).split("\n")[0]}\n`);
  // What the page showed, for the test's log.
  for (const p of browser.contexts().flatMap((c) => c.pages())) {
    const tiles = await p.locator(".pop").evaluateAll((ts) =>
      ts.map((t) => `${t.dataset.pop} active=${t.dataset.active} stale=${t.dataset.stale}: ${t.innerText.replace(/\s+/g, " ")}`)).catch(() => []);
    for (const t of tiles) process.stderr.write(`page: ${t}\n`);
  }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
