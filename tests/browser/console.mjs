// The /ui console in a real Chromium: sign in through the OpenID provider,
// watch a chat request arrive as events, and check the page logged nothing
// wrong. Run by tests/browser_console.rs; exits 0 on success, 1 otherwise.
//
// Env: GATEWAY_URL, SUBJECT (the provider's user), NAME (optional, the name
// #who should show), API_KEY (an admin key for the chat request),
// SCREENSHOT (a .png path; the phone-size one gets `-phone` before `.png`),
// CHROMIUM_PATH (default /usr/bin/chromium).
import { chromium } from 'playwright-core';

const { GATEWAY_URL, SUBJECT, NAME, API_KEY, SCREENSHOT } = process.env;
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic',
];

function fail(message) {
  console.error(`FAILED: ${message}`);
  process.exit(1);
}

for (const [name, value] of Object.entries({ GATEWAY_URL, SUBJECT, API_KEY, SCREENSHOT })) {
  if (!value) fail(`env ${name} is not set`);
}
const gateway = new URL(GATEWAY_URL).origin;
setTimeout(() => fail('the whole script took over 60 s'), 60_000).unref();

// Errors, warnings and failed requests, kept if they concern the gateway (the
// page showing or the URL asked for); the provider's own page is a test
// double that links a CDN stylesheet, so what happens there is only shown.
const problems = [];
const elsewhere = [];
const step = (what) => console.log(`- ${what}`);

async function main() {
  const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: ARGS });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.setDefaultTimeout(15_000);
    // Nothing leaves this machine (the provider's page links a CDN stylesheet).
    await page.route(/^https?:\/\/(?!127\.0\.0\.1[:/])/, (route) => route.abort('blockedbyclient'));
    const note = (text, url = '') => {
      const ours = [page.url(), url].some((u) => u.startsWith(`${gateway}/`));
      (ours ? problems : elsewhere).push(`${text} (page ${page.url()})`);
    };
    page.on('console', (m) => {
      if (m.type() === 'error' || m.type() === 'warning') note(`console ${m.type()}: ${m.text()}`, m.location().url);
    });
    page.on('pageerror', (e) => note(`page error: ${e.message}`));
    page.on('requestfailed', (r) => note(`request failed: ${r.method()} ${r.url()}: ${r.failure()?.errorText}`, r.url()));
    page.on('response', (r) => {
      if (r.status() >= 400) note(`HTTP ${r.status()}: ${r.request().method()} ${r.url()}`, r.url());
    });

    step('open /ui, not signed in');
    await page.goto(`${gateway}/ui`);
    await page.locator('#conn-state[data-state="unauthorised"]').waitFor();
    await page.locator('#sign-in').waitFor({ state: 'visible' });

    step('sign in at the provider');
    await page.click('#sign-in');
    await page.waitForURL((url) => url.origin !== gateway);
    const form = page.locator('form').first();
    await form.locator('input[name="sub"]').fill(SUBJECT);
    await form.getByRole('button', { name: 'Authorize' }).click();
    await page.waitForURL(`${gateway}/ui`);
    await page.locator('#conn-state[data-state="live"]').waitFor();
    await page.locator('#who', { hasText: NAME || SUBJECT }).waitFor();
    await page.locator('#who-admin').waitFor({ state: 'visible' });
    await page.locator('#sign-out').waitFor({ state: 'visible' });

    step('make a chat request');
    const response = await fetch(`${gateway}/v1/chat/completions`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ model: 'mock-1', messages: [{ role: 'user', content: 'hello from the browser test' }] }),
    });
    const requestId = response.headers.get('x-request-id');
    if (!response.ok || !requestId) fail(`chat request: HTTP ${response.status}, x-request-id ${requestId}`);
    console.log(`REQUEST_ID ${requestId}`);

    step('see its events in the list');
    await page.locator('li.event-row[data-type="usage.recorded"]').first().waitFor();
    const row = page.locator('li.event-row[data-type="audit.request"]').first();
    await row.click();
    await page.locator('#detail', { hasText: requestId }).waitFor();
    for (const topic of ['audit', 'usage']) {
      const count = Number(await page.locator(`#count-${topic}`).textContent());
      if (!(count >= 1)) fail(`#count-${topic} shows ${count}, expected at least 1`);
    }
    // The charts redraw once a second.
    await page.locator('#chart-requests-total', { hasText: /^1$/ }).waitFor();
    await page.locator('#chart-cost-total', { hasText: /^\$0\.0*[1-9]/ }).waitFor();
    await page.locator('#chart-requests rect[height]:not([height="0"])').first().waitFor();
    await page.screenshot({ path: SCREENSHOT, fullPage: true });

    step("the specification page's client, pasted into the console with no token");
    // The seed's example as written, but for the URL: the page's own host and
    // no token, so the session cookie authenticates it.
    const seedLogs = [];
    page.on('console', (m) => { if (m.text().startsWith('Event:')) seedLogs.push(m.text()); });
    await page.evaluate(`
const ws = new WebSocket("ws://${new URL(gateway).host}/ws/events");
ws.onmessage = (event) => {
const data = JSON.parse(event.data);
console.log("Event:", data.type, data.payload);
};
ws.onclose = () => {
console.log("Connection closed, reconnecting...");
// Implement reconnection logic
};`);
    // Waits until the pasted client has logged `count` events of `type`.
    const until = async (type, count = 1) => {
      const deadline = Date.now() + 15_000;
      while (seedLogs.filter((l) => l.startsWith(`Event: ${type} `)).length < count) {
        if (Date.now() > deadline) fail(`the pasted client logged no ${type}: ${JSON.stringify(seedLogs)}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    await until('connected');
    const again = await fetch(`${gateway}/v1/chat/completions`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ model: 'mock-1', messages: [{ role: 'user', content: 'for the pasted client' }] }),
    });
    if (!again.ok) fail(`second chat request: HTTP ${again.status}`);
    await until('usage.recorded');

    step('pause, miss a request, resume by id');
    await page.click('#pause');
    await page.locator('#conn-state[data-state="paused"]').waitFor();
    const audits = () => page.locator('li.event-row[data-type="audit.request"]').count();
    const before = await audits();
    const whilePaused = await fetch(`${gateway}/v1/chat/completions`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ model: 'mock-1', messages: [{ role: 'user', content: 'while paused' }] }),
    });
    const pausedId = whilePaused.headers.get('x-request-id');
    await until('usage.recorded', 2); // published by now: the pasted client saw it
    if ((await audits()) !== before) fail('an event arrived while paused');
    await page.click('#pause');
    await page.locator('#conn-state[data-state="live"]').waitFor();
    await page.locator('.notice[data-kind="resumed"]').first().waitFor();
    // The replayed event is rendered (rows are added in batches), once.
    await page.waitForFunction(
      (n) => document.querySelectorAll('li.event-row[data-type="audit.request"]').length >= n,
      before + 1,
    );
    await page.locator('li.event-row[data-type="audit.request"]').first().click();
    await page.locator('#detail', { hasText: pausedId }).waitFor();
    if ((await audits()) !== before + 1) fail(`after resuming: ${await audits()} audit rows, expected ${before + 1}`);

    step('phone-size viewport');
    await page.setViewportSize({ width: 375, height: 740 });
    const scrollWidth = await page.evaluate(() => new Promise((done) => {
      requestAnimationFrame(() => done(document.documentElement.scrollWidth));
    }));
    await page.screenshot({ path: SCREENSHOT.replace(/\.png$/, '-phone.png'), fullPage: true });
    if (scrollWidth > 376) fail(`at 375 px wide the page scrolls sideways (scrollWidth ${scrollWidth})`);
  } finally {
    await browser.close();
  }
  if (elsewhere.length) console.log(`not the gateway's (ignored):\n  ${elsewhere.join('\n  ')}`);
  if (problems.length) fail(`the browser reported ${problems.length} problem(s):\n  ${problems.join('\n  ')}`);
  console.log('OK');
}

main().then(() => process.exit(0), (e) => fail(e.stack || e));
