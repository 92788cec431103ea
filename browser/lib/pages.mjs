// The browser side: Chromium (Debian's /usr/bin/chromium through playwright-core), the four
// profiles (language x screen), and the checks every page gets (axe-core WCAG 2.1 A/AA, lang,
// labels, errors tied to fields, tap targets, no horizontal scrolling at 360 px, no console
// errors, 303 after POST) plus screenshots.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

import { record } from './harness.mjs';

const require = createRequire(import.meta.url);
const AXE_SOURCE = fs.readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8');
const AXE_TAGS = ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'];

export const CHROMIUM = '/usr/bin/chromium';

const ANDROID_UA =
  'Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Mobile Safari/537.36';

/** Language x screen. `full`: every flow runs; otherwise the smoke test of login and menu. */
export const PROFILES = {
  jaDesktop: { id: 'ja-desktop', lang: 'ja', locale: 'ja-JP', viewport: { width: 1280, height: 800 }, mobile: false, full: true },
  enPhone: { id: 'en-phone', lang: 'en', locale: 'en-US', viewport: { width: 360, height: 740 }, mobile: true, full: true },
  jaPhone: { id: 'ja-phone', lang: 'ja', locale: 'ja-JP', viewport: { width: 360, height: 740 }, mobile: true, full: false },
  enDesktop: { id: 'en-desktop', lang: 'en', locale: 'en-US', viewport: { width: 1280, height: 800 }, mobile: false, full: false },
};
export const PHONE_VIEWPORT = { width: 360, height: 740 };

/** --rewrite-null-origin: a diagnostic only (see README), never used by scripts/test.sh. */
export const settings = { rewriteNullOrigin: false };

/** The ja/en message catalogs of the templates (simple `key = "value"` TOML lines). */
export function loadCatalogs(repo) {
  const out = {};
  for (const lang of ['ja', 'en']) {
    const map = {};
    const text = fs.readFileSync(path.join(repo, 'templates', 'locales', `${lang}.toml`), 'utf8');
    for (const line of text.split('\n')) {
      const m = line.match(/^([A-Za-z0-9_]+)\s*=\s*("(?:[^"\\]|\\.)*")\s*$/);
      if (m) map[m[1]] = JSON.parse(m[2]);
    }
    out[lang] = (key, fills = {}) => {
      if (!(key in map)) throw new Error(`catalog ${lang} has no key ${key}`);
      return map[key].replace(/\{([a-z_]+)\}/g, (all, k) => (k in fills ? String(fills[k]) : all));
    };
  }
  return out;
}

/** Chromium with the flags of the brief; no host name resolves, only 127.0.0.1 is reachable. */
export async function launchChromium() {
  const { chromium } = await import('playwright-core');
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1',
    ],
  });
}

const JAPANESE = /[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]/;

/** One browser context in one profile (its own cookies: one student's browser or phone). */
export class Run {
  constructor(browser, profile, catalogs, { javaScriptEnabled = true, label, shots } = {}) {
    this.browser = browser;
    this.profile = profile;
    this.t = catalogs[profile.lang];
    this.js = javaScriptEnabled;
    this.label = label ?? `${profile.id}${javaScriptEnabled ? '' : ' no-js'}`;
    this.shots = shots; // { dir, docs: Map } or undefined
    this.tabs = [];
  }

  async open() {
    const p = this.profile;
    this.ctx = await this.browser.newContext({
      locale: p.locale,
      timezoneId: 'Asia/Tokyo',
      viewport: p.viewport,
      isMobile: p.mobile,
      hasTouch: p.mobile,
      deviceScaleFactor: 1,
      userAgent: p.mobile ? ANDROID_UA : undefined,
      javaScriptEnabled: this.js,
    });
    this.ctx.setDefaultTimeout(15_000);
    this.ctx.setDefaultNavigationTimeout(20_000);
    if (settings.rewriteNullOrigin) {
      // Chromium sends "Origin: null" with form posts from pages with Referrer-Policy:
      // no-referrer; this replaces it with the page's origin to see what lies behind.
      await this.ctx.route(
        (url) => url.hostname === '127.0.0.1',
        async (route) => {
          const req = route.request();
          const headers = req.headers();
          if (req.method() === 'POST' && headers.origin === 'null') {
            // Chromium does not let an intercepted request change its Origin: send it from here.
            const response = await route.fetch({ headers: { ...headers, origin: new URL(req.url()).origin }, maxRedirects: 0 });
            return route.fulfill({ response });
          }
          return route.continue();
        },
      );
    }
    return this;
  }

  async tab() {
    const tab = new Tab(this, await this.ctx.newPage());
    this.tabs.push(tab);
    return tab;
  }

  async close() {
    await this.ctx?.close().catch(() => {});
  }
}

let shotSeq = 0;

export class Tab {
  constructor(run, page) {
    this.run = run;
    this.page = page;
    this.t = run.t;
    this.consoleErrors = [];
    this.documents = new Set();
    this.redirectProblems = [];
    page.on('console', (m) => {
      if (m.type() === 'error') this.consoleErrors.push({ text: m.text(), url: m.location()?.url ?? '' });
    });
    page.on('pageerror', (e) => this.consoleErrors.push({ text: `uncaught: ${e.message}`, url: '' }));
    page.on('response', (r) => {
      const req = r.request();
      if (!req.isNavigationRequest() || r.frame() !== page.mainFrame()) return;
      this.documents.add(r.url());
      const s = r.status();
      if (s === 307 || s === 308) this.redirectProblems.push(`${req.method()} ${r.url()} answered ${s}`);
      else if (req.method() === 'POST' && s >= 300 && s < 400 && s !== 303) this.redirectProblems.push(`POST ${r.url()} answered ${s}, not 303`);
    });
  }

  get url() {
    return new URL(this.page.url());
  }

  /** Runs `action` and waits for the document it navigates to; returns its (final) response. */
  async navigate(action) {
    const page = this.page;
    const response = page.waitForResponse(
      (r) => r.request().isNavigationRequest() && r.frame() === page.mainFrame() && (r.status() < 300 || r.status() >= 400),
      { timeout: 20_000 },
    );
    const loaded = page.waitForEvent('load', { timeout: 20_000 });
    await action();
    const [r] = await Promise.all([response, loaded]);
    return r;
  }

  async goto(url) {
    return this.navigate(() => this.page.goto(url, { waitUntil: 'commit' }));
  }

  /** Clicks (a button or link that navigates) and waits for the next page. */
  async click(locator) {
    return this.navigate(() => locator.click());
  }

  field(label) {
    return this.page.getByLabel(label, { exact: true });
  }

  button(name) {
    return this.page.getByRole('button', { name, exact: true });
  }

  link(name) {
    return this.page.getByRole('link', { name, exact: true });
  }

  /** Text of the role="alert" boxes, one entry per line (<p>). */
  async alertLines() {
    return this.page.locator('[role="alert"] p').allInnerTexts().then((a) => a.map((s) => s.trim()).filter(Boolean));
  }

  async statusText() {
    return (await this.page.locator('[role="status"]').allInnerTexts()).join(' ').trim();
  }

  async text() {
    return this.page.locator('body').innerText();
  }

  /**
   * Every check on the current page, recorded as one result "[profile] page NAME".
   * opts: allowJapanese (English pages showing data in Japanese), expectAlert, expectStatus.
   */
  async check(name, opts = {}) {
    const run = this.run;
    const page = this.page;
    const label = `[${run.label}] page ${name}`;
    const problems = [];
    try {
      await page.waitForLoadState('load');
      const facts = await withTimeout(page.evaluate(pageFacts), 15_000, 'reading the page');
      const p = run.profile;
      if (facts.lang !== p.lang) problems.push(`<html lang> is ${JSON.stringify(facts.lang)}, expected ${p.lang}`);
      if (facts.viewport !== 'width=device-width, initial-scale=1') problems.push(`viewport meta is ${JSON.stringify(facts.viewport)}`);
      if (!facts.title) problems.push('no <title>');
      if (facts.scrollWidth > facts.clientWidth) problems.push(`horizontal scrolling at ${facts.clientWidth} px: content is ${facts.scrollWidth} px wide (${facts.widest.join(', ')})`);
      for (const s of facts.small) problems.push(`tap target smaller than 44 px: ${s}`);
      for (const s of facts.unlabelled) problems.push(`input without a <label>: ${s}`);
      for (const s of facts.dangling) problems.push(`aria-describedby names a missing id: ${s}`);
      for (const s of facts.filledPasswords) problems.push(`password field rendered with a value: ${s}`);
      for (const a of facts.alerts) {
        if (!a.text) problems.push('empty role="alert"');
        if (facts.formInputs.length && !a.id) problems.push('role="alert" without an id on a form page (cannot be tied to fields)');
      }
      if (facts.alerts.length) for (const s of facts.untied) problems.push(`error not tied to field (aria-describedby): ${s}`);
      // A refused form: the title says so first (what a screen reader reads on arrival).
      if (facts.alerts.length && facts.formInputs.length && !facts.title.startsWith(this.t('error_title_prefix'))) {
        problems.push(`the title of a page with a form error does not start with ${JSON.stringify(this.t('error_title_prefix'))}: ${JSON.stringify(facts.title)}`);
      }
      for (const s of facts.statuses) if (!s) problems.push('empty role="status"');
      if (opts.expectAlert && facts.alerts.length === 0) problems.push('expected an error message (role="alert")');
      if (opts.expectStatus && facts.statuses.length === 0) problems.push('expected a success message (role="status")');
      if (p.lang === 'en' && !opts.allowJapanese) {
        const jp = facts.text.split('\n').filter((l) => JAPANESE.test(l) && l.trim() !== facts.langSwitch);
        if (jp.length) problems.push(`Japanese text on an English page: ${jp.slice(0, 3).map((l) => JSON.stringify(l.slice(0, 80))).join(', ')}`);
      }
      const switchText = p.lang === 'ja' ? 'English' : '日本語';
      if (facts.langSwitch !== switchText) problems.push(`language switch reads ${JSON.stringify(facts.langSwitch)}, expected ${switchText}`);
      // Console errors; a document's own non-2xx status (a 404 or 422 page) is not one.
      const errors = this.consoleErrors.splice(0);
      for (const e of errors) {
        if (/^Failed to load resource: the server responded with a status of \d+/.test(e.text) && this.documents.has(e.url)) continue;
        problems.push(`console error: ${e.text}${e.url ? ` (${e.url})` : ''}`);
      }
      problems.push(...this.redirectProblems.splice(0));
      if (run.js) {
        for (const v of await withTimeout(runAxe(page), 30_000, 'axe-core')) problems.push(`axe ${v.id} (${v.impact}): ${v.help} — ${v.nodes.join(' ; ')}`);
      }
      await this.screenshot(name, problems);
    } catch (e) {
      problems.push(`check could not run: ${e.message.split('\n')[0]}`);
    }
    record(label, problems);
    return problems.length === 0;
  }

  /** Japanese runs keep a screenshot of each page; the desktop one also one at 360 px. */
  async screenshot(name, problems) {
    const shots = this.run.shots;
    if (!shots || this.run.profile.lang !== 'ja') return;
    const seq = String(++shotSeq).padStart(3, '0');
    const file = (sub) => {
      const dir = path.join(shots.dir, sub);
      fs.mkdirSync(dir, { recursive: true });
      return path.join(dir, `${seq}-${name}.png`);
    };
    const page = this.page;
    const docs = shots.docs?.get(`${this.run.label}/${name}`);
    if (docs) {
      // For the README: one screen at the given size, not the full page (small PNGs).
      const size = page.viewportSize();
      await page.setViewportSize(docs.viewport);
      try {
        fs.mkdirSync(path.dirname(docs.file), { recursive: true });
        await page.screenshot({ path: docs.file, fullPage: false });
      } finally {
        await page.setViewportSize(size);
      }
    }
    await page.screenshot({ path: file(this.run.label.replace(/ /g, '-')), fullPage: true });
    if (!this.run.profile.mobile) {
      const size = page.viewportSize();
      await page.setViewportSize(PHONE_VIEWPORT);
      try {
        const f = await page.evaluate(() => ({ sw: document.documentElement.scrollWidth, cw: document.documentElement.clientWidth }));
        if (f.sw > f.cw) problems.push(`horizontal scrolling at 360 px: content is ${f.sw} px wide`);
        const phone = file(`${this.run.label.replace(/ /g, '-')}@360px`);
        await page.screenshot({ path: phone, fullPage: true });
        // WCAG 1.4.10 (reflow) asks for 320 CSS px: no horizontal scrolling there either.
        await page.setViewportSize({ width: 320, height: PHONE_VIEWPORT.height });
        const g = await page.evaluate(() => ({ sw: document.documentElement.scrollWidth, cw: document.documentElement.clientWidth }));
        if (g.sw > g.cw) problems.push(`horizontal scrolling at 320 px: content is ${g.sw} px wide`);
      } finally {
        await page.setViewportSize(size);
      }
    }
  }
}

/** Runs in the page: what the checks need (no page script is required for any of it). */
function pageFacts() {
  const visible = (el) => {
    const r = el.getBoundingClientRect();
    const cs = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && cs.visibility !== 'hidden' && cs.display !== 'none' && !el.closest('[hidden]')
      && !(el.closest('details:not([open])') && !el.matches('details > summary'));
  };
  const describe = (el) => {
    let s = el.tagName.toLowerCase();
    if (el.id) s += `#${el.id}`;
    else if (el.getAttribute('name')) s += `[name=${el.getAttribute('name')}]`;
    else if (el.className && typeof el.className === 'string') s += `.${el.className.trim().split(/\s+/).join('.')}`;
    const text = (el.innerText || el.value || el.getAttribute('aria-label') || '').trim().replace(/\s+/g, ' ').slice(0, 40);
    return text ? `${s} "${text}"` : s;
  };
  const de = document.documentElement;
  const facts = {
    lang: de.getAttribute('lang'),
    viewport: document.querySelector('meta[name="viewport"]')?.getAttribute('content') ?? null,
    title: document.title.trim(),
    scrollWidth: Math.max(de.scrollWidth, document.body.scrollWidth),
    clientWidth: de.clientWidth,
    widest: [],
    small: [],
    unlabelled: [],
    dangling: [],
    untied: [],
    filledPasswords: [],
    formInputs: [],
    alerts: [],
    statuses: [],
    text: document.body.innerText,
    langSwitch: document.querySelector('.lang-switch')?.innerText.trim() ?? null,
  };
  if (facts.scrollWidth > facts.clientWidth) {
    for (const el of document.body.querySelectorAll('*')) {
      const r = el.getBoundingClientRect();
      if (r.right > facts.clientWidth + 1 && facts.widest.length < 3) facts.widest.push(`${describe(el)} right=${Math.round(r.right)}`);
    }
  }
  const interactive = 'a[href], button, input:not([type="hidden"]), select, textarea, summary, [role="button"], [tabindex]:not([tabindex="-1"])';
  for (const el of document.querySelectorAll(interactive)) {
    if (!visible(el)) continue;
    const r = el.getBoundingClientRect();
    if (r.width < 44 || r.height < 44) facts.small.push(`${describe(el)} is ${Math.round(r.width)}x${Math.round(r.height)}`);
  }
  const fields = [...document.querySelectorAll('input:not([type="hidden"]):not([type="submit"]):not([type="button"]), select, textarea')];
  for (const el of fields) {
    if (!(el.labels && [...el.labels].some((l) => l.innerText.trim()))) facts.unlabelled.push(describe(el));
    if (el.type === 'password' && el.value !== '') facts.filledPasswords.push(describe(el));
    if (visible(el)) facts.formInputs.push(describe(el));
  }
  for (const el of document.querySelectorAll('[aria-describedby]')) {
    for (const id of el.getAttribute('aria-describedby').split(/\s+/).filter(Boolean)) {
      if (!document.getElementById(id)) facts.dangling.push(`${describe(el)} -> ${id}`);
    }
  }
  const alerts = [...document.querySelectorAll('[role="alert"]')];
  facts.alerts = alerts.map((a) => ({ id: a.id, text: a.innerText.trim() }));
  const alertIds = new Set(alerts.map((a) => a.id).filter(Boolean));
  for (const el of fields) {
    if (!visible(el)) continue;
    const ids = (el.getAttribute('aria-describedby') ?? '').split(/\s+/);
    if (!ids.some((id) => alertIds.has(id))) facts.untied.push(describe(el));
  }
  facts.statuses = [...document.querySelectorAll('[role="status"]')].map((s) => s.innerText.trim());
  return facts;
}

/** page.evaluate has no timeout of its own: a hung page fails its check instead of the suite. */
function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms / 1000} s`)), ms);
    }),
  ]);
}

async function runAxe(page) {
  if (!(await page.evaluate(() => typeof window.axe === 'object'))) await page.evaluate(AXE_SOURCE);
  return page.evaluate(async (tags) => {
    const r = await window.axe.run(document, { runOnly: { type: 'tag', values: tags }, resultTypes: ['violations'] });
    return r.violations.map((v) => ({
      id: v.id,
      impact: v.impact,
      help: v.help,
      nodes: v.nodes.slice(0, 4).map((n) => `${n.target.join(' ')}${n.failureSummary ? ` [${n.failureSummary.replace(/\s+/g, ' ').slice(0, 160)}]` : ''}`),
    }));
  }, AXE_TAGS);
}
