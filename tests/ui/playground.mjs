// Drives the playground (/ui) in a real Chromium through playwright-core.
// Run by tests/ui.rs, which starts the gateway and backends and passes:
// ADMIN_URL, COMPOSITION, BROKEN_YAML + ERROR_AT (a text on the line the
// error must be shown at), FIXED_YAML, PARAMS (JSON), EXPECT_CALLS (comma
// list), and optionally TOKEN, SCREENSHOT, LOGIN_SCREENSHOT, APPLY. Prints a JSON summary.
import { chromium } from 'playwright-core';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';

const env = process.env;
const need = k => { if (!env[k]) throw new Error(`missing ${k}`); return env[k]; };
const admin = need('ADMIN_URL');
const name = need('COMPOSITION');
const profile = mkdtempSync(join(tmpdir(), 'manifold-ui-'));
const summary = { urls: [] };

const context = await chromium.launchPersistentContext(profile, {
  executablePath: env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
  viewport: { width: 1280, height: 1000 },
});
try {
  const page = context.pages()[0] || await context.newPage();
  page.setDefaultTimeout(15000);
  page.on('request', r => summary.urls.push(r.url()));
  page.on('pageerror', e => { console.error('page error:', e.message); summary.page_error = e.message; });
  await page.goto(`${admin}/ui`);

  if (env.TOKEN) {
    await page.locator('#login').waitFor({ state: 'visible' });
    summary.asked_for_token = true;
    if (await page.locator('#app').isVisible()) throw new Error('the app shows before the token is given');
    if (env.LOGIN_SCREENSHOT) {
      mkdirSync(dirname(env.LOGIN_SCREENSHOT), { recursive: true });
      await page.screenshot({ path: env.LOGIN_SCREENSHOT });
    }
    await page.fill('#token', env.TOKEN);
    await page.click('#login-form button');
  }
  await page.locator(`[data-composition="${name}"]`).click();
  await page.waitForFunction(() => document.getElementById('yaml').value.length > 0);
  await page.locator('#validity.ok').waitFor();

  // An error: shown at its field's line.
  const broken = need('BROKEN_YAML');
  await page.fill('#yaml', broken);
  const expected = broken.split('\n').findIndex(l => l.includes(need('ERROR_AT'))) + 1;
  if (expected < 1) throw new Error('ERROR_AT is not in BROKEN_YAML');
  await page.locator('#validity.bad').waitFor();
  const marked = page.locator(`#mirror .line.error[data-line="${expected}"] .msg`);
  await marked.waitFor();
  summary.error_message = await marked.textContent();
  summary.error_line = expected;
  summary.errors_listed = await page.locator('#errors li').count();
  if (!summary.errors_listed) throw new Error('no error in the list');
  if (env.SCREENSHOT) {
    mkdirSync(dirname(env.SCREENSHOT), { recursive: true });
    await page.screenshot({ path: env.SCREENSHOT.replace(/\.png$/, '-error.png'), fullPage: true });
  }

  // Fixed: valid again.
  await page.fill('#yaml', need('FIXED_YAML'));
  await page.locator('#validity.ok').waitFor();
  if (await page.locator('#mirror .line.error').count()) throw new Error('errors still marked');

  // Run: every call in the waterfall with a status.
  for (const [k, v] of Object.entries(JSON.parse(env.PARAMS || '{}'))) await page.fill(`[data-param="${k}"]`, v);
  await page.click('#run');
  await page.locator('#waterfall .wf-row[data-call]').first().waitFor();
  summary.calls = {};
  for (const call of need('EXPECT_CALLS').split(',')) {
    const row = page.locator(`#waterfall .wf-row[data-call="${call}"]`);
    await row.waitFor();
    const status = await row.getAttribute('data-status');
    if (!status) throw new Error(`call ${call} has no status`);
    summary.calls[call] = Number(status);
  }
  if (env.EXPECT_NOT_RUN) {
    const row = page.locator(`#waterfall .wf-row[data-call="${env.EXPECT_NOT_RUN}"]`);
    await row.waitFor();
    const cls = await row.getAttribute('class');
    if (!cls.includes('notrun') || cls.includes('failed')) throw new Error(`${env.EXPECT_NOT_RUN} should show as not run, not failed: class="${cls}"`);
    summary.not_run_label = await row.locator('.wf-label').textContent();
  }
  summary.response_status = await page.locator('#resp-status').textContent();
  if (env.SCREENSHOT) await page.screenshot({ path: env.SCREENSHOT, fullPage: true });

  if (env.APPLY) {
    await page.click('#apply');
    await page.locator('#diff').waitFor({ state: 'visible' });
    await page.waitForFunction(() => document.getElementById('diff-text').textContent.length > 0);
    summary.diff = await page.locator('#diff-text').textContent();
    if (!summary.diff.includes(name)) throw new Error(`the diff does not name ${name}: ${summary.diff}`);
    await page.click('#confirm');
    await page.locator('#applied.ok').waitFor();
    summary.applied = await page.locator('#applied').textContent();
  }
  if (summary.page_error) throw new Error(`page error: ${summary.page_error}`);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(summary));
