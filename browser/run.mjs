#!/usr/bin/env node
// Real-browser test suite of nidan: headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core; no browser is ever downloaded) walks every flow of the seed manual against
// throw-away nidan instances on loopback ports:
//
//   first login -> email registration -> link from the real mail -> second-password setup with
//   every rule violation -> login with all three -> the relying party gets the second-password
//   level; step-up from a password-level session; the gear menu (change email, change second
//   password, manual, logout); forgot second password; expired, reused and broken links; idle
//   timeout; a locked account; the first login again through a real slapd and a real SMTP server
//   with our own relying party (openid-client); the main flow again with JavaScript disabled.
//
// Full flows run in Japanese at desktop size and in English at phone size (mobile user agent);
// Japanese-phone and English-desktop get a smoke test of login and menu. Every page gets axe-core
// (WCAG 2.1 A/AA), lang, labels, errors tied to fields, 44 px tap targets, no horizontal
// scrolling at 360 px, no console errors and 303-after-POST checks; Japanese pages are
// screenshotted to browser/screenshots/.
//
//   node browser/run.mjs [--nidan PATH] [--only WORD]... [--keep] [--verbose] [--docs]
//
// Prints one line per check and, last, exactly one line "N passed, N failed, N skipped".
// Exits 1 if any check failed. Never contacts anything but 127.0.0.1.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { assert, closingLine, counts, eq, need, section, selected, setOnly, show, skip, sleep, test } from './lib/harness.mjs';
import { PROFILES, Run, launchChromium, loadCatalogs, CHROMIUM, settings } from './lib/pages.mjs';
import { LDAP_STUDENTS, Nidan, SLAPD_BIN, killChildrenNow, startRpListener, startSlapd, startSmtpSink, stopChildren, tempDirs } from './lib/servers.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..');
const SHOTS = path.join(HERE, 'screenshots');
const DOCS_SHOTS = path.join(REPO, 'docs', 'screenshots');

const ACR_PASSWORD = 'urn:nidan:acr:password';
const ACR_SECOND = 'urn:nidan:acr:second-password';
const MAIL_FROM = 'noreply@example.ac.jp';
/** The whole suite is killed after this long (the CI must stay bounded). */
const WATCHDOG_MS = 12 * 60_000;

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

function parseArgs(argv) {
  const opts = { nidan: null, only: [], keep: false, verbose: false, docs: false, rewriteNullOrigin: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--nidan') opts.nidan = argv[++i];
    else if (a.startsWith('--nidan=')) opts.nidan = a.slice(8);
    else if (a === '--only') opts.only.push(argv[++i]);
    else if (a === '--keep') opts.keep = true;
    else if (a === '--verbose' || a === '-v') opts.verbose = true;
    else if (a === '--docs') opts.docs = true;
    else if (a === '--rewrite-null-origin') opts.rewriteNullOrigin = true;
    else if (a === '--help' || a === '-h') {
      console.log('usage: node browser/run.mjs [--nidan PATH] [--only WORD]... [--keep] [--verbose] [--docs]');
      console.log('  --nidan PATH  nidan binary (default target/debug/nidan, then target/release/nidan)');
      console.log('  --only WORD   run only the flows whose title contains WORD (setup always runs)');
      console.log('  --keep        keep the temporary directories (configs, databases, server logs)');
      console.log('  --verbose     print the server logs at the end');
      console.log('  --docs        also write the main Japanese screenshots to docs/screenshots/');
      console.log('  --rewrite-null-origin  diagnostic: replace the "Origin: null" of form posts with the page origin');
      process.exit(0);
    } else {
      console.error(`unknown argument: ${a}`);
      process.exit(2);
    }
  }
  return opts;
}
const OPTS = parseArgs(process.argv.slice(2));
setOnly(OPTS.only);
settings.rewriteNullOrigin = OPTS.rewriteNullOrigin;

function findBinary() {
  if (OPTS.nidan) return path.resolve(OPTS.nidan);
  for (const p of ['target/debug/nidan', 'target/release/nidan']) {
    const full = path.join(REPO, p);
    if (fs.existsSync(full)) return full;
  }
  return null;
}

// ---------------------------------------------------------------------------
// Students
// ---------------------------------------------------------------------------

let nextNumber = 2500100;
const digits = (n) => String(randomBytes(4).readUInt32BE(0) % 10 ** n).padStart(n, '0');

/** A student of the file directory; `enrolled` ones are imported with an email and a second password. */
function student(role, { enrolled = false } = {}) {
  const number = nextNumber++;
  const username = `s${number}`;
  return {
    role,
    username,
    // Satisfies every second-password rule on purpose: typing it as the second password must
    // fail only because it is the university password.
    password: `Univ${digits(4)}Pass${String(number).slice(-3)}`,
    second: enrolled ? `Nidan${digits(4)}Key` : undefined,
    email: `${username}@example.ac.jp`,
    enrolled,
    claims: {
      name: `Student ${number}`,
      family_name: 'Student',
      given_name: String(number),
      student_id: username.toUpperCase(),
      affiliation: 'student',
    },
  };
}

/** Students per profile and role, created before the servers start. */
const S = {};
for (const p of Object.values(PROFILES)) {
  S[p.id] = p.full
    ? {
        first: student('first'),
        stepUp: student('step-up', { enrolled: true }),
        menu: student('menu', { enrolled: true }),
        forgot: student('forgot', { enrolled: true }),
        lock: student('lock', { enrolled: true }),
        expire: student('expire'),
        idle: student('idle', { enrolled: true }),
        other: student('other', { enrolled: true }),
      }
    : { smoke: student('smoke', { enrolled: true }) };
}
S.noJs = { first: student('first-nojs') };

const mainStudents = [];
const shortStudents = [];
for (const [profile, roles] of Object.entries(S)) {
  for (const s of Object.values(roles)) {
    s.profile = profile;
    (s.role === 'expire' || s.role === 'idle' ? shortStudents : mainStudents).push(s);
  }
}

// ---------------------------------------------------------------------------
// Shared state
// ---------------------------------------------------------------------------

const env = {
  browser: null,
  main: null, // file directory, file mail (/dev/mail, /demo), second-password lock after 3
  short: null, // NIDAN_SESSION_IDLE_TIMEOUT=3s and 4-second one-time links
  ldap: null, // slapd directory, SMTP mail, our own relying party
  slapd: null,
  smtp: null,
  rp: null,
  rpSecret: `rp-${randomBytes(24).toString('base64url')}`,
  catalogs: loadCatalogs(REPO),
  shots: { dir: SHOTS, docs: null },
  /** Mails of the file transport already read (instance name + mail id). */
  seenMail: new Set(),
  /** Profiles whose /dev/mail page was checked. */
  checkedDevMail: new Set(),
  /** Per profile: links used in earlier flows. */
  links: {},
};

// ---------------------------------------------------------------------------
// Helpers shared by the flows
// ---------------------------------------------------------------------------

/** Fills the login page and presses ログイン / Log in. */
async function login(tab, s, second = s.second ?? '') {
  const t = tab.t;
  await tab.field(t('username_label')).fill(s.username);
  await tab.field(t('password_label')).fill(s.password);
  await tab.field(t('second_password_label')).fill(second);
  return tab.click(tab.button(t('login_button')));
}

function expectPath(tab, pathname, what) {
  const u = tab.url;
  if (u.pathname !== pathname) throw new Error(`${what}: expected ${pathname}, the browser is at ${u.pathname}${u.search}`);
}

async function expectAlert(tab, keys, what, fills = {}) {
  const lines = await tab.alertLines();
  const expected = keys.map((k) => tab.t(k, fills));
  eq(lines.join(' | '), expected.join(' | '), `${what}: the error lines`);
}

async function expectEmptyPasswords(tab) {
  const filled = await tab.page.locator('input[type="password"]').evaluateAll((els) => els.filter((e) => e.value !== '').map((e) => e.name));
  eq(filled.join(','), '', 'password fields rendered with a value');
}

/** A value the page or mail must contain (a failure, not a skip, when missing). */
function must(value, what) {
  if (value === undefined || value === null || value === '') throw new Error(`missing: ${what}`);
  return value;
}

const LINK_RE = /http:\/\/127\.0\.0\.1:\d+\/link\/[A-Za-z0-9_-]+/;

/**
 * The newest unread mail to `to` with `subject` in an instance's development mailbox
 * (/dev/mail, the file transport), read in a second tab of the student's browser.
 */
async function devMail(run, inst, to, subject, { check = true } = {}) {
  const tab = await run.tab();
  try {
    const deadline = Date.now() + 15_000;
    let first = true;
    for (;;) {
      await tab.goto(inst.url('/dev/mail'));
      if (first && check && !env.checkedDevMail.has(run.label)) {
        env.checkedDevMail.add(run.label);
        // The mailbox shows everybody's mail, in whatever language each was sent.
        await tab.check('dev-mail', { allowJapanese: true });
      }
      first = false;
      const mails = await tab.page.locator('li.mail').evaluateAll((els) =>
        els.map((el) => {
          const dds = el.querySelectorAll('dl dd');
          return { id: el.id, to: dds[1]?.innerText.trim(), subject: dds[2]?.innerText.trim(), body: el.querySelector('pre')?.innerText ?? '' };
        }),
      );
      const mail = mails.find((m) => m.to === to && m.subject === subject && !env.seenMail.has(`${inst.name}/${m.id}`));
      if (mail) {
        env.seenMail.add(`${inst.name}/${mail.id}`);
        mail.link = mail.body.match(LINK_RE)?.[0];
        return mail;
      }
      if (Date.now() > deadline) throw new Error(`no mail "${subject}" to ${to} in ${inst.name}'s /dev/mail within 15 s`);
      await sleep(400);
    }
  } finally {
    await tab.page.close();
  }
}

/** Opens the gear menu; checks its name and place (top right of the page column). */
async function openMenu(tab) {
  const page = tab.page;
  const summary = page.locator('header details.menu > summary');
  eq(await summary.count(), 1, 'gear menu controls in the header');
  eq((await summary.innerText()).trim(), tab.t('menu'), 'the gear menu is named');
  const box = await summary.boundingBox();
  const column = await page.locator('.site-header-inner').boundingBox();
  assert(box && column && box.x + box.width >= column.x + column.width - 24 && box.y < 80,
    `the gear is not at the top right: ${show(box)} in ${show(column)}`);
  if (!(await page.locator('header details.menu').evaluate((d) => d.open))) await summary.click();
  assert(await page.locator('header details.menu').evaluate((d) => d.open), 'the menu did not open');
  const menu = page.locator('header details.menu');
  const items = await menu.locator('.menu-item').allInnerTexts();
  eq(items.map((s) => s.trim()).join(' | '),
    ['menu_change_email', 'menu_change_second_password', 'menu_manual', 'menu_logout'].map((k) => tab.t(k)).join(' | '),
    'menu items');
  return menu;
}

async function menuItem(tab, key) {
  const menu = await openMenu(tab);
  const name = tab.t(key);
  const item = key === 'menu_logout' ? menu.getByRole('button', { name, exact: true }) : menu.getByRole('link', { name, exact: true });
  return tab.click(item);
}

/** The demo relying party's result: acr and the ID token claims it shows. */
async function demoResult(tab) {
  const page = tab.page;
  const errors = await tab.alertLines();
  if (errors.length) throw new Error(`the demo relying party shows an error: ${errors.join(' ')}`);
  const pres = page.locator('section.result pre');
  assert((await pres.count()) >= 1, 'the demo relying party shows no result');
  const claims = JSON.parse(await pres.first().innerText());
  const userinfo = (await pres.count()) > 1 ? JSON.parse(await pres.nth(1).innerText()) : null;
  const acr = (await page.locator('section.result dd code').first().innerText()).trim();
  return { acr, claims, userinfo };
}

async function withRun(profile, opts, fn) {
  const run = await new Run(env.browser, profile, env.catalogs, { shots: env.shots, ...opts }).open();
  try {
    return await fn(run);
  } finally {
    await run.close();
  }
}

// ---------------------------------------------------------------------------
// Flows
// ---------------------------------------------------------------------------

/** First login -> email -> link -> second-password rules -> login with all three -> /demo claims. */
async function firstLoginFlow(run, s) {
  const t = run.t;
  const tab = await run.tab();
  await tab.goto(env.main.url('/demo'));
  await tab.check('demo');
  await tab.click(tab.link(t('demo_start_second_password')));
  expectPath(tab, '/login', 'the demo relying party sends the student to');
  assert(tab.url.searchParams.get('tx'), 'the login page keeps the pending request (tx)');
  await tab.check('login');
  const text = await tab.text();
  for (const key of ['login_note_first_login', 'login_note_logout', 'login_note_auto_logout', 'login_check_password', 'login_check_case', 'login_check_half_width', 'forgot_second_password']) {
    assert(text.includes(t(key)), `the login page lacks the seed's text ${show(t(key))}`);
  }

  // A wrong university password: the generic message, tied to the fields, nothing echoed.
  await tab.field(t('username_label')).fill(s.username);
  await tab.field(t('password_label')).fill(`${s.password}x`);
  await tab.click(tab.button(t('login_button')));
  expectPath(tab, '/login', 'a wrong password stays on');
  await expectAlert(tab, ['login_failed'], 'wrong password');
  eq(await tab.field(t('username_label')).inputValue(), s.username, 'the user ID is kept');
  await expectEmptyPasswords(tab);
  await tab.check('login-failed', { expectAlert: true });

  // First login: university ID and password, second password empty.
  await login(tab, s, '');
  expectPath(tab, '/enroll/email', 'the first login leads to');
  await tab.check('enroll-email');
  assert((await tab.text()).includes(MAIL_FROM), 'the registration page shows the sender address for allow lists');

  await tab.field(t('email_label')).fill('not-an-address');
  await tab.field(t('confirm_label')).fill(s.email);
  const bad = await tab.click(tab.button(t('button_confirm')));
  await expectAlert(tab, ['email_invalid', 'email_mismatch'], 'a malformed, unconfirmed address');
  eq(bad.status(), 422, 'status of the refused form');
  eq(await tab.field(t('confirm_label')).inputValue(), '', 'the confirmation field is not prefilled');
  await tab.check('enroll-email-errors', { expectAlert: true });

  await tab.field(t('email_label')).fill(s.email);
  await tab.field(t('confirm_label')).fill(s.email);
  await tab.click(tab.button(t('button_confirm')));
  assert((await tab.statusText()).includes(t('email_sent_message')), 'the "confirmation mail sent" message');
  assert((await tab.text()).includes(t('link_validity_note', { minutes: 30 })), 'the page states the 30-minute validity');
  await tab.check('email-sent', { expectStatus: true });

  const mail = await devMail(run, env.main, s.email, t('mail_subject_verify_email'));
  assert(mail.body.includes(t('mail_link_validity', { minutes: 30 })), `the mail states its validity (${show(t('mail_link_validity', { minutes: 30 }))})`);
  const link = must(mail.link, 'a one-time URL in the mail');

  // The link's GET only shows a button (mail scanners must not use it up).
  await tab.goto(link);
  assert((await tab.text()).includes(s.email), 'the confirmation page names the address');
  await tab.check('link-confirm');
  await tab.click(tab.button(t('button_confirm')));
  assert((await tab.statusText()).includes(t('email_registered_message')), 'the "email address registered" message');
  await tab.check('email-registered', { expectStatus: true });
  env.links[run.label] = { ...(env.links[run.label] ?? {}), verify: link };

  await tab.click(tab.link(t('go_to_login')));
  expectPath(tab, '/login', '"go to the login page" leads to');
  assert(tab.url.searchParams.get('tx'), 'the pending request survives the registration');
  await login(tab, s, '');
  expectPath(tab, '/enroll/second-password', 'after the email, the login leads to');
  await tab.check('enroll-second-password');
  for (const key of ['sp_rule_length', 'sp_rule_uppercase', 'sp_rule_lowercase', 'sp_rule_digit', 'sp_rule_half_width']) {
    assert((await tab.text()).includes(t(key)), `the setup page lacks the rule ${show(t(key))}`);
  }

  // Every rule, one at a time, then several at once (one line each).
  const long = `Aa1${'x'.repeat(62)}`;
  const cases = [
    ['Abcde1', 'Abcde1', ['rule_too_short']],
    ['abcdefg1', 'abcdefg1', ['rule_no_uppercase']],
    ['ABCDEFG1', 'ABCDEFG1', ['rule_no_lowercase']],
    ['Abcdefgh', 'Abcdefgh', ['rule_no_digit']],
    ['Abcdefg1!', 'Abcdefg1!', ['rule_half_width']],
    ['Abcdefg1２', 'Abcdefg1２', ['rule_half_width']],
    [long, long, ['rule_too_long']],
    ['Abcdefg1', 'Abcdefg2', ['rule_confirmation_mismatch']],
    [s.password, s.password, ['rule_same_as_university_password']],
    ['abc', 'abd', ['rule_too_short', 'rule_no_uppercase', 'rule_no_digit', 'rule_confirmation_mismatch']],
  ];
  let checked = false;
  for (const [value, confirmation, keys] of cases) {
    await tab.field(t('second_password_label')).fill(value);
    await tab.field(t('confirm_label')).fill(confirmation);
    const r = await tab.click(tab.button(t('button_set')));
    eq(r.status(), 422, `status for ${keys.join('+')}`);
    expectPath(tab, '/enroll/second-password', `a refused second password (${keys.join('+')}) stays on`);
    await expectAlert(tab, keys, `second password ${show(value.slice(0, 12))}`);
    await expectEmptyPasswords(tab);
    if (!checked) {
      checked = true;
      await tab.check('enroll-second-password-errors', { expectAlert: true });
    }
  }
  s.second = `Nidan${digits(4)}Set`;
  await tab.field(t('second_password_label')).fill(s.second);
  await tab.field(t('confirm_label')).fill(s.second);
  await tab.click(tab.button(t('button_set')));
  eq(await tab.statusText(), t('second_password_set_message'), 'the success message');
  await tab.check('second-password-set', { expectStatus: true });
  await tab.click(tab.link(t('button_ok')));
  expectPath(tab, '/login', 'OK leads to');

  // Login with all three: straight back to the relying party at the second-password level.
  await login(tab, s);
  expectPath(tab, '/demo/callback', 'the login with all three returns to the relying party at');
  const r = await demoResult(tab);
  eq(r.acr, ACR_SECOND, 'acr shown by the relying party');
  eq(r.claims.acr, ACR_SECOND, 'acr claim');
  eq(JSON.stringify(r.claims.amr), '["pwd"]', 'amr claim');
  eq(r.claims.preferred_username, s.username, 'preferred_username');
  eq(r.claims.student_id, s.claims.student_id, 'student_id');
  eq(r.claims.email, s.email, 'email (the registered address)');
  eq(r.claims.email_verified, true, 'email_verified');
  assert(typeof r.claims.sid === 'string' && r.claims.sid, 'sid claim');
  assert(typeof r.claims.auth_time === 'number', 'auth_time claim');
  await tab.check('demo-result');
  return { tab };
}

/** A password-level session (SSO) reaches a client that needs more: only the second password. */
async function stepUpFlow(run, s) {
  const t = run.t;
  const tab = await run.tab();
  await tab.goto(env.main.url('/demo'));
  await tab.click(tab.link(t('demo_start_password')));
  expectPath(tab, '/login', 'the password-level request shows');
  await login(tab, s, '');
  expectPath(tab, '/demo/callback', 'university ID and password alone return to the relying party at');
  const low = await demoResult(tab);
  eq(low.claims.acr, ACR_PASSWORD, 'acr at the password level');
  await tab.check('demo-result-password-level');

  await tab.click(tab.link(t('demo_start_second_password')));
  expectPath(tab, '/login/step-up', 'the second-password level from a password-level session asks at');
  eq(await tab.page.locator('input[name="username"], input[name="password"]').count(), 0, 'user ID / password fields on the step-up page');
  assert((await tab.text()).includes(s.username), 'the step-up page names the student');
  await tab.check('step-up');

  // An empty second password: the browser itself refuses the form (required), with or without JavaScript.
  await tab.button(t('login_button')).click();
  await sleep(300);
  expectPath(tab, '/login/step-up', 'an empty second password stays on');
  assert(await tab.field(t('second_password_label')).evaluate((el) => el.required && el.validity.valueMissing), 'the empty second password is refused by the browser (required)');

  await tab.field(t('second_password_label')).fill(`${s.second}x`);
  await tab.click(tab.button(t('login_button')));
  await expectAlert(tab, ['login_failed'], 'wrong second password');
  await expectEmptyPasswords(tab);

  await tab.field(t('second_password_label')).fill(s.second);
  await tab.click(tab.button(t('login_button')));
  expectPath(tab, '/demo/callback', 'the step-up returns to the relying party at');
  const high = await demoResult(tab);
  eq(high.claims.acr, ACR_SECOND, 'acr after the step-up');
  eq(high.claims.sid, low.claims.sid, 'sid stays the same across the step-up');
  assert(high.claims.auth_time >= low.claims.auth_time, 'auth_time moves forward');
}

/** The gear menu: change email, change second password, manual, logout. */
async function menuFlow(run, s) {
  const t = run.t;
  const tab = await run.tab();
  await tab.goto(env.main.url('/login'));
  await login(tab, s);
  expectPath(tab, '/account', 'a login without a pending request opens');
  assert((await tab.text()).includes(s.email), 'the menu page shows the registered address');
  await tab.check('account');
  await openMenu(tab);
  await tab.check('menu-open');

  // Change email address.
  await menuItem(tab, 'menu_change_email');
  expectPath(tab, '/account/email', 'メールアドレス変更 opens');
  await tab.check('account-email');
  const newEmail = `${s.username}.new@example.ac.jp`;
  await tab.field(t('new_email_label')).fill(newEmail);
  await tab.field(t('confirm_label')).fill(`x${newEmail}`);
  await tab.field(t('current_second_password_label')).fill(`${s.second}x`);
  await tab.click(tab.button(t('button_confirm')));
  await expectAlert(tab, ['email_mismatch', 'rule_current_wrong'], 'mismatched address and wrong second password');
  await expectEmptyPasswords(tab);
  await tab.check('account-email-errors', { expectAlert: true });

  await tab.field(t('new_email_label')).fill(newEmail);
  await tab.field(t('confirm_label')).fill(newEmail);
  await tab.field(t('current_second_password_label')).fill(s.second);
  await tab.click(tab.button(t('button_confirm')));
  assert((await tab.statusText()).includes(t('email_change_sent_message')), 'the "confirmation mail sent" message');
  await tab.check('email-change-sent', { expectStatus: true });
  const mail = await devMail(run, env.main, newEmail, t('mail_subject_change_email'));
  assert(mail.body.includes(t('mail_link_validity', { minutes: 30 })), 'the mail states its validity');
  await tab.goto(must(mail.link, 'a one-time URL in the mail'));
  assert((await tab.text()).includes(newEmail), 'the confirmation page names the new address');
  await tab.check('link-confirm-change');
  await tab.click(tab.button(t('button_confirm')));
  assert((await tab.statusText()).includes(t('email_changed_message')), 'the "email address changed" message');
  await tab.check('email-changed', { expectStatus: true });
  await devMail(run, env.main, s.email, t('mail_subject_email_changed'), { check: false });
  await tab.click(tab.link(t('button_ok')));
  expectPath(tab, '/account', 'OK leads back to');
  assert((await tab.text()).includes(newEmail), 'the menu page shows the new address');
  s.email = newEmail;

  // Change second password.
  await menuItem(tab, 'menu_change_second_password');
  expectPath(tab, '/account/second-password', '第2パスワード変更 opens');
  await tab.check('account-second-password');
  await tab.field(t('current_second_password_label')).fill(`${s.second}x`);
  await tab.field(t('new_second_password_label')).fill('short1A');
  await tab.field(t('confirm_label')).fill('short1A');
  await tab.click(tab.button(t('button_change')));
  await expectAlert(tab, ['rule_current_wrong', 'rule_too_short'], 'wrong current and a too short new one');
  await expectEmptyPasswords(tab);
  await tab.check('account-second-password-errors', { expectAlert: true });
  await tab.field(t('current_second_password_label')).fill(s.second);
  await tab.field(t('new_second_password_label')).fill(s.password);
  await tab.field(t('confirm_label')).fill(s.password);
  await tab.click(tab.button(t('button_change')));
  await expectAlert(tab, ['rule_same_as_university_password'], 'the university password as the new second password');
  const next = `Nidan${digits(4)}New`;
  await tab.field(t('current_second_password_label')).fill(s.second);
  await tab.field(t('new_second_password_label')).fill(next);
  await tab.field(t('confirm_label')).fill(next);
  await tab.click(tab.button(t('button_change')));
  eq(await tab.statusText(), t('second_password_changed_message'), 'the success message');
  await tab.check('second-password-changed', { expectStatus: true });
  s.second = next;
  await devMail(run, env.main, s.email, t('mail_subject_second_password_changed'), { check: false });
  await tab.click(tab.link(t('button_ok')));
  expectPath(tab, '/account', 'OK leads back to');

  // Manual, in the same tab.
  await menuItem(tab, 'menu_manual');
  expectPath(tab, '/manual', 'マニュアル opens');
  eq(tab.run.ctx.pages().length, 1, 'tabs open after the manual (same tab)');
  await tab.check('manual');

  // Logout: the session ends at once; the logged-out page has no form.
  await menuItem(tab, 'menu_logout');
  assert((await tab.statusText()).includes(t('logged_out_message')), 'the "logged out" message');
  eq(await tab.page.locator('form').count(), 0, 'forms on the logged-out page');
  await tab.check('logged-out', { expectStatus: true });
  await tab.goto(env.main.url('/account'));
  expectPath(tab, '/login', 'after logout /account leads to');

  // The new second password works.
  await login(tab, s);
  expectPath(tab, '/account', 'the changed second password signs in to');
}

/** Forgot the second password: mail, then the reset page asks for the university credentials. */
async function forgotFlow(run, s) {
  const t = run.t;
  const tab = await run.tab();
  await tab.goto(env.main.url('/login'));
  await tab.click(tab.link(t('forgot_second_password')));
  expectPath(tab, '/forgot', '第2パスワードを忘れた場合 opens');
  await tab.check('forgot');
  await tab.click(tab.button(t('button_send')));
  await expectAlert(tab, ['email_required'], 'no address');
  await tab.check('forgot-errors', { expectAlert: true });

  // The same answer whether or not the address is registered.
  await tab.field(t('registered_email_label')).fill(`nobody.${s.username}@example.ac.jp`);
  await tab.click(tab.button(t('button_send')));
  const unknown = await tab.text();
  await tab.goto(env.main.url('/forgot'));
  await tab.field(t('registered_email_label')).fill(s.email);
  await tab.click(tab.button(t('button_send')));
  assert((await tab.statusText()).includes(t('reset_sent_message')), 'the "sent" message');
  eq(await tab.text(), unknown, 'the page for a registered address equals the one for an unknown address');
  await tab.check('forgot-sent', { expectStatus: true });

  const mail = await devMail(run, env.main, s.email, t('mail_subject_reset'));
  assert(mail.body.includes(t('mail_link_validity', { minutes: 30 })), 'the mail states its validity');
  const link = must(mail.link, 'a one-time URL in the mail');
  await tab.goto(link);
  eq(await tab.field(t('username_label')).inputValue(), '', 'the user ID on the reset page');
  await tab.check('reset');

  const fill = async (username, password, value, confirmation = value) => {
    await tab.field(t('username_label')).fill(username);
    await tab.field(t('password_label')).fill(password);
    await tab.field(t('second_password_label')).fill(value);
    await tab.field(t('confirm_label')).fill(confirmation);
    return tab.click(tab.button(t('button_set')));
  };
  const next = `Nidan${digits(4)}Rst`;
  await fill(s.username, `${s.password}x`, next);
  await expectAlert(tab, ['reset_wrong_account_or_password'], 'a wrong university password');
  await expectEmptyPasswords(tab);
  await tab.check('reset-errors', { expectAlert: true });
  await fill(S[run.profile.id].menu.username, S[run.profile.id].menu.password, next);
  await expectAlert(tab, ['reset_wrong_account_or_password'], 'another student\'s credentials');
  await fill(s.username, s.password, 'abcdefgh');
  await expectAlert(tab, ['rule_no_uppercase', 'rule_no_digit'], 'a rule violation');
  await fill(s.username, s.password, s.password);
  await expectAlert(tab, ['rule_same_as_university_password'], 'the university password');
  await fill(s.username, s.password, next);
  eq(await tab.statusText(), t('second_password_set_message'), 'the success message');
  await tab.check('reset-done', { expectStatus: true });
  s.second = next;
  await devMail(run, env.main, s.email, t('mail_subject_second_password_changed'), { check: false });
  await tab.click(tab.link(t('button_ok')));
  expectPath(tab, '/login', 'OK leads to');
  await login(tab, s);
  expectPath(tab, '/account', 'the new second password signs in to');

  // The link is used up.
  const again = await tab.goto(link);
  eq(again.status(), 410, 'status of a used reset link');
  await expectAlert(tab, ['link_reason_used'], 'the used reset link');
}

/** Reused and broken links (main instance); expired ones (the 4-second instance). */
async function linksFlow(run, s) {
  const t = run.t;
  const tab = await run.tab();
  const verify = need(env.links[run.label]?.verify, 'the registration link of the first-login flow');
  let r = await tab.goto(verify);
  eq(r.status(), 410, 'status of a used link');
  await expectAlert(tab, ['link_reason_used'], 'a used link');
  await tab.check('link-used', { expectAlert: true });

  r = await tab.goto(verify.replace(/\/link\/.*/, `/link/${randomBytes(32).toString('base64url')}`));
  eq(r.status(), 404, 'status of an unknown link');
  await expectAlert(tab, ['link_reason_invalid'], 'an unknown link');
  await tab.check('link-invalid', { expectAlert: true });
  r = await tab.goto(`${verify.slice(0, -10)}`);
  eq(r.status(), 404, 'status of a link cut off');
  await expectAlert(tab, ['link_reason_invalid'], 'a link cut off');

  // Expired: the short instance's links live 4 seconds.
  await tab.goto(env.short.url('/login'));
  await login(tab, s, '');
  expectPath(tab, '/enroll/email', 'the first login leads to');
  await tab.field(t('email_label')).fill(s.email);
  await tab.field(t('confirm_label')).fill(s.email);
  await tab.click(tab.button(t('button_confirm')));
  const sentAt = Date.now();
  const mail = await devMail(run, env.short, s.email, t('mail_subject_verify_email'), { check: false });
  const link = must(mail.link, 'a one-time URL in the mail');
  await sleep(Math.max(0, sentAt + 5500 - Date.now()));
  r = await tab.goto(link);
  eq(r.status(), 410, 'status of an expired link');
  await expectAlert(tab, ['link_reason_expired'], 'an expired link');
  await tab.check('link-expired', { expectAlert: true });
}

/** Idle timeout (NIDAN_SESSION_IDLE_TIMEOUT=3s): activity keeps the session, 3 s of nothing ends it. */
async function idleFlow(run, s) {
  const tab = await run.tab();
  await tab.goto(env.short.url('/login'));
  await login(tab, s);
  expectPath(tab, '/account', 'the login opens');
  // Requests restart the idle timer: 4 s in all with a request every second (nidan counts
  // whole seconds, so the gaps stay well below 3 s even on a loaded machine).
  for (let i = 0; i < 4; i++) {
    await sleep(1000);
    await tab.goto(env.short.url('/account'));
    expectPath(tab, '/account', `activity after ${i + 1} s keeps the session:`);
  }
  await sleep(4500);
  await tab.goto(env.short.url('/account'));
  expectPath(tab, '/login', 'after 4.5 s without a request, /account leads to');
  await tab.check('login-after-idle-timeout');
  await tab.goto(env.short.url('/login/step-up'));
  expectPath(tab, '/login', 'the expired session is gone for the step-up page too:');
}

/** Three wrong second passwords lock the second-password level (main: second_password_failures = 3). */
async function lockFlow(run, s) {
  const t = run.t;
  const tab = await run.tab();
  await tab.goto(env.main.url('/login'));
  for (let i = 0; i < 3; i++) {
    await login(tab, s, `${s.second}${i}`);
    await expectAlert(tab, ['login_failed'], `wrong second password #${i + 1}`);
  }
  const r = await login(tab, s);
  eq(r.status(), 429, 'status of the locked login');
  const lines = await tab.alertLines();
  const lockedRe = new RegExp(`^${t('locked', { until: '\u0000' }).replace(/[.*+?^${}()|[\]\\]/g, '\\$&').replace('\u0000', '\\d{2}:\\d{2}')}$`);
  assert(lockedRe.test(lines[0] ?? ''), `the lock message with its end time, got ${show(lines[0])}`);
  assert(lines.some((l) => l.includes('Student Support Office')), 'the lock message names the help desk');
  await expectEmptyPasswords(tab);
  await tab.check('login-locked', { expectAlert: true });

  // The lock is told only after a correct university password.
  await tab.field(t('username_label')).fill(s.username);
  await tab.field(t('password_label')).fill(`${s.password}x`);
  await tab.field(t('second_password_label')).fill(s.second);
  await tab.click(tab.button(t('login_button')));
  await expectAlert(tab, ['login_failed'], 'a wrong university password on a locked account');
}

/** The first login through a real slapd and a real SMTP server, to our own relying party. */
async function ldapFlow(run, st) {
  const t = run.t;
  const client = await import('openid-client');
  const rp = env.rp;
  const config = await client.discovery(new URL(env.ldap.issuer), 'certificates', { redirect_uris: [rp.redirectUri], token_endpoint_auth_method: 'client_secret_basic' },
    client.ClientSecretBasic(env.rpSecret), { execute: [client.allowInsecureRequests] });
  const start = async () => {
    const verifier = client.randomPKCECodeVerifier();
    const state = client.randomState();
    const nonce = client.randomNonce();
    const url = client.buildAuthorizationUrl(config, {
      redirect_uri: rp.redirectUri,
      scope: 'openid profile email student',
      state,
      nonce,
      code_challenge: await client.calculatePKCECodeChallenge(verifier),
      code_challenge_method: 'S256',
    });
    return { url, verifier, state, nonce };
  };
  const email = `${st.username}.${run.profile.id}@mail.example.jp`;
  const tab = await run.tab();
  let req = await start();
  await tab.goto(req.url.href);
  expectPath(tab, '/login', 'the relying party sends the student to');
  await login(tab, st, '');
  expectPath(tab, '/enroll/email', 'the first login (LDAP) leads to');
  await tab.field(t('email_label')).fill(email);
  await tab.field(t('confirm_label')).fill(email);
  await tab.click(tab.button(t('button_confirm')));
  assert((await tab.statusText()).includes(t('email_sent_message')), 'the "confirmation mail sent" message');

  const mail = await env.smtp.take(email);
  eq(mail.subject, t('mail_subject_verify_email'), 'subject of the mail received over SMTP');
  eq(mail.from, MAIL_FROM, 'envelope sender');
  assert(/text\/plain/i.test(mail.contentType) && /utf-8/i.test(mail.contentType), `content type ${show(mail.contentType)}`);
  assert(mail.body.includes(t('mail_link_validity', { minutes: 30 })), 'the mail states its validity');
  const link = must(mail.body.match(LINK_RE)?.[0], 'a one-time URL in the mail');

  // The student opens the URL on the phone (another browser), as the page says one may.
  await withRun(run.profile, { label: `${run.label} (other browser)`, shots: undefined }, async (phone) => {
    const p = await phone.tab();
    await p.goto(link);
    await p.click(p.button(t('button_confirm')));
    assert((await p.statusText()).includes(t('email_registered_message')), 'the "email address registered" message in the other browser');
  });

  // Back on the first browser the student starts again from the relying party: the login
  // resumes at the missing step (the second-password setup), never at a step-up page.
  req = await start();
  await tab.goto(req.url.href);
  const problems = [];
  if (tab.url.pathname === '/login/step-up') {
    problems.push(`starting again from the relying party after the email registration shows the step-up page (${tab.url.pathname}), which asks for a second password the student does not have yet; expected the second-password setup`);
    await tab.goto(env.ldap.url(`/login?tx=${tab.url.searchParams.get('tx')}`));
  }
  if (tab.url.pathname === '/login') await login(tab, st, '');
  expectPath(tab, '/enroll/second-password', 'the login (LDAP) after the email leads to');
  await tab.field(t('second_password_label')).fill(st.password);
  await tab.field(t('confirm_label')).fill(st.password);
  await tab.click(tab.button(t('button_set')));
  await expectAlert(tab, ['rule_same_as_university_password'], 'the LDAP password as the second password');
  st.second = `Nidan${digits(4)}Ldp`;
  await tab.field(t('second_password_label')).fill(st.second);
  await tab.field(t('confirm_label')).fill(st.second);
  await tab.click(tab.button(t('button_set')));
  eq(await tab.statusText(), t('second_password_set_message'), 'the success message');
  await tab.click(tab.link(t('button_ok')));
  expectPath(tab, '/login', 'OK leads to');
  await login(tab, st);
  const landed = tab.url;
  eq(`${landed.origin}${landed.pathname}`, rp.redirectUri, 'the login with all three returns to');
  eq(landed.searchParams.get('iss'), env.ldap.issuer, 'iss in the authorization response');
  assert(landed.searchParams.get('code'), 'the authorization response carries a code');

  const tokens = await client.authorizationCodeGrant(config, landed, { pkceCodeVerifier: req.verifier, expectedState: req.state, expectedNonce: req.nonce, idTokenExpected: true });
  const claims = tokens.claims();
  eq(claims.acr, ACR_SECOND, 'acr');
  eq(JSON.stringify(claims.amr), '["pwd"]', 'amr');
  eq(claims.preferred_username, st.username, 'preferred_username');
  eq(claims.student_id, st.employeeNumber, 'student_id (employeeNumber from LDAP)');
  eq(claims.email, email, 'email (the registered address)');
  const info = await client.fetchUserInfo(config, tokens.access_token, claims.sub);
  eq(info.email, email, 'userinfo email');
  eq(info.name, st.cn[0], 'userinfo name (cn from LDAP)');
  if (st.snKana) eq(info['family_name#ja-Kana-JP'], st.snKana, 'family_name#ja-Kana-JP');
  if (problems.length) throw new Error(problems.join('; '));
}

/** The remaining pages: RP-initiated logout's confirmation, error pages, the public manual. */
async function otherPagesFlow(run, s) {
  const t = run.t;
  const tab = await run.tab();
  await tab.goto(env.main.url('/login'));
  await login(tab, s);
  expectPath(tab, '/account', 'the login opens');
  // End session without an id_token_hint: one confirmation form, then the logged-out page.
  await tab.goto(env.main.url('/logout'));
  assert((await tab.text()).includes(t('logout_question')), 'the logout question');
  await tab.check('logout-confirm');
  await tab.click(tab.button(t('logout_button')));
  assert((await tab.statusText()).includes(t('logged_out_message')), 'the "logged out" message');
  await tab.goto(env.main.url('/account'));
  expectPath(tab, '/login', 'after the logout /account leads to');

  let r = await tab.goto(env.main.url('/authorize?client_id=unknown-client&response_type=code&scope=openid&redirect_uri=http%3A%2F%2F127.0.0.1%3A9%2Fcb'));
  eq(r.status(), 400, 'status of an unknown client');
  await expectAlert(tab, ['error_unknown_client'], 'an unknown client');
  await tab.check('error-unknown-client', { expectAlert: true });
  r = await tab.goto(env.main.url('/no-such-page'));
  eq(r.status(), 404, 'status of an unknown page');
  await expectAlert(tab, ['error_not_found'], 'an unknown page');
  await tab.check('error-not-found', { expectAlert: true });
  await tab.goto(env.main.url('/manual'));
  await tab.check('manual-signed-out');
}

/** Presses Tab until `locator` has the focus (at most `max` times). */
async function tabTo(tab, locator, max = 12) {
  for (let i = 0; i < max; i++) {
    await tab.page.keyboard.press('Tab');
    if (await locator.evaluate((el) => el === document.activeElement)) return;
  }
  throw new Error(`Tab did not reach ${locator}`);
}

/** The two other profiles: login and the menu (on the desktop with the keyboard only). */
async function smokeFlow(run, s) {
  const t = run.t;
  const tab = await run.tab();
  await tab.goto(env.main.url('/login'));
  await tab.check('login');
  if (run.profile.mobile) {
    await login(tab, s);
  } else {
    // Keyboard only: Tab to each field in order, type, Enter submits.
    await tabTo(tab, tab.field(t('username_label')));
    await tab.page.keyboard.type(s.username);
    await tabTo(tab, tab.field(t('password_label')), 1);
    await tab.page.keyboard.type(s.password);
    await tabTo(tab, tab.field(t('second_password_label')), 1);
    await tab.page.keyboard.type(s.second);
    await tab.navigate(() => tab.page.keyboard.press('Enter'));
  }
  expectPath(tab, '/account', 'the login opens');
  await tab.check('account');
  if (!run.profile.mobile) {
    // The gear opens with the keyboard; its first item comes next in the Tab order.
    const summary = tab.page.locator('header details.menu > summary');
    await tabTo(tab, summary);
    await tab.page.keyboard.press('Enter');
    assert(await tab.page.locator('header details.menu').evaluate((d) => d.open), 'Enter on the gear opens the menu');
    await tab.page.keyboard.press('Tab');
    eq(await tab.page.evaluate(() => document.activeElement?.textContent.trim()), t('menu_change_email'), 'the focus after the gear');
  }
  await openMenu(tab);
  await tab.check('menu-open');
  await menuItem(tab, 'menu_logout');
  assert((await tab.statusText()).includes(t('logged_out_message')), 'the "logged out" message');
  await tab.check('logged-out', { expectStatus: true });
}

/** The main flow with JavaScript disabled, then the menu (a <details>) and logout. */
async function noJsFlow(run, s) {
  const { tab } = await firstLoginFlow(run, s);
  await tab.goto(env.main.url('/account'));
  expectPath(tab, '/account', 'the menu page opens');
  await menuItem(tab, 'menu_logout');
  assert((await tab.statusText()).includes(run.t('logged_out_message')), 'the "logged out" message');
}

// ---------------------------------------------------------------------------
// Setup, the plan, teardown
// ---------------------------------------------------------------------------

async function setup(bin) {
  section('setup');
  await test(`Chromium ${CHROMIUM} through playwright-core`, async () => {
    assert(fs.existsSync(CHROMIUM), `${CHROMIUM} is missing (apt-get install chromium)`);
    env.browser = await launchChromium();
    return env.browser.version();
  });
  await test('nidan: file directory + /dev/mail + /demo, and the 3-second idle timeout instance', async () => {
    assert(bin && fs.existsSync(bin), `no nidan binary ${bin ?? 'in target/'} (cargo build --bin nidan)`);
    env.main = new Nidan(bin, 'main', { students: mainStudents, tables: { throttle: { second_password_failures: 3 } } });
    env.short = new Nidan(bin, 'short', {
      students: shortStudents,
      tables: { lifetimes: { one_time_link: '4s' } },
      env: { NIDAN_SESSION_IDLE_TIMEOUT: '3s' },
    });
    await Promise.all([env.main.prepare(), env.short.prepare()]);
    await Promise.all([env.main.start(), env.short.start()]);
    env.main.importStudents(mainStudents.filter((s) => s.enrolled));
    env.short.importStudents(shortStudents.filter((s) => s.enrolled));
  });
  await test('slapd, SMTP sink, relying party and the LDAP + SMTP nidan instance', async () => {
    need(bin && fs.existsSync(bin), 'a nidan binary');
    if (!fs.existsSync(SLAPD_BIN)) skip(`${SLAPD_BIN} is missing (apt-get install slapd ldap-utils)`);
    env.slapd = await startSlapd();
    env.smtp = await startSmtpSink();
    env.rp = await startRpListener();
    env.ldap = new Nidan(bin, 'ldap', {
      directory: env.slapd.directory,
      mail: { transport: 'smtp', from: MAIL_FROM, host: '127.0.0.1', port: env.smtp.port, tls: 'none' },
      // The relying party's secret sits in a file of the instance's directory.
      clients: (dir) => {
        const secretFile = path.join(dir, 'certificates.secret');
        fs.writeFileSync(secretFile, env.rpSecret, { mode: 0o600 });
        return [
          {
            client_id: 'certificates',
            client_secret_file: secretFile,
            redirect_uris: [env.rp.redirectUri],
            token_endpoint_auth_method: 'client_secret_basic',
            grant_types: ['authorization_code'],
            scopes: ['openid', 'profile', 'email', 'student'],
            min_acr: ACR_SECOND,
          },
        ];
      },
    });
    await env.ldap.prepare();
    await env.ldap.start();
    eq(env.ldap.ready.directory, 'ok', '/readyz directory');
  });
}

/** One form post from Chromium reaches nidan's handler (names the cause when it does not). */
async function canary() {
  section('a form post from Chromium');
  await test('the login form posted by Chromium passes the CSRF check', async () => {
    need(env.browser && env.main, 'the browser and the nidan instances');
    await withRun(PROFILES.enDesktop, { shots: undefined, label: 'canary' }, async (run) => {
      const tab = await run.tab();
      let origin;
      tab.page.on('request', (req) => {
        if (req.method() === 'POST') origin = req.headers().origin;
      });
      await tab.goto(env.main.url('/login'));
      await tab.field(run.t('username_label')).fill('nobody');
      await tab.field(run.t('password_label')).fill('wrong-password');
      await tab.click(tab.button(run.t('login_button')));
      const lines = await tab.alertLines();
      if (lines.includes(run.t('csrf_failed')) || lines.includes(run.t('error_csrf'))) {
        throw new Error(`nidan refuses the form as a CSRF failure: Chromium sent "Origin: ${origin}"`
          + (origin === 'null' ? ' (what browsers send for a form post from a page with Referrer-Policy: no-referrer); every form of every flow below fails the same way' : ''));
      }
      await expectAlert(tab, ['login_failed'], 'an unknown student');
    });
  });
}

async function flow(profileLabel, title, fn) {
  const name = `[${profileLabel}] ${title}`;
  if (!selected(name)) return;
  await test(name, fn);
}

async function runFull(profile) {
  section(`${profile.id}: every flow (${profile.lang}, ${profile.viewport.width}x${profile.viewport.height}${profile.mobile ? ', mobile user agent' : ''})`);
  const s = S[profile.id];
  const ready = () => need(env.browser && env.main, 'the browser and the nidan instances');
  const each = (title, fn) => flow(profile.id, title, async () => {
    ready();
    await withRun(profile, {}, fn);
  });
  await each('first login → email registration → link from the mail → second-password rules → login with all three → demo RP at the second-password level', (run) => firstLoginFlow(run, s.first));
  await each('step-up from a password-level session', (run) => stepUpFlow(run, s.stepUp));
  await each('gear menu: change email, change second password, manual, logout', (run) => menuFlow(run, s.menu));
  await each('forgot second password', (run) => forgotFlow(run, s.forgot));
  await each('used, broken and expired links', (run) => {
    need(env.short, 'the short-lived instance');
    return linksFlow(run, s.expire);
  });
  await each('idle-timeout logout (3 s)', (run) => idleFlow(run, s.idle));
  await each('a locked account (3 wrong second passwords)', (run) => lockFlow(run, s.lock));
  await each('other pages: logout confirmation, error pages, the manual signed out', (run) => otherPagesFlow(run, s.other));
  const ldapStudent = { ...LDAP_STUDENTS[profile.lang === 'ja' ? 0 : 1] };
  await flow(profile.id, 'first login with LDAP (slapd) and real SMTP → own relying party (openid-client) at the second-password level', async () => {
    ready();
    need(env.ldap, 'slapd and the LDAP instance');
    await withRun(profile, {}, (run) => ldapFlow(run, ldapStudent));
  });
}

async function runSmoke(profile) {
  section(`${profile.id}: smoke test of login and menu (${profile.lang}, ${profile.viewport.width}x${profile.viewport.height}${profile.mobile ? ', mobile user agent' : ''})`);
  await flow(profile.id, `smoke: login and the gear menu${profile.mobile ? '' : ' (keyboard only)'}`, async () => {
    need(env.browser && env.main, 'the browser and the nidan instances');
    await withRun(profile, {}, (run) => smokeFlow(run, S[profile.id].smoke));
  });
}

async function runNoJs() {
  const profile = PROFILES.jaDesktop;
  section('ja-desktop with JavaScript disabled: the main flow');
  await flow(`${profile.id} no-js`, 'first login → … → demo RP, then the menu and logout, without JavaScript', async () => {
    need(env.browser && env.main, 'the browser and the nidan instances');
    await withRun(profile, { javaScriptEnabled: false }, (run) => noJsFlow(run, S.noJs.first));
  });
}

/** The main Japanese screenshots for the README (docs/screenshots/, one screen each: small PNGs). */
function docsShots() {
  const phone = { width: 360, height: 740 };
  const desktop = { width: 1280, height: 560 };
  return new Map(
    [
      ['ja-desktop/login', 'login.png', phone],
      ['ja-desktop/enroll-email', 'email-registration.png', phone],
      ['ja-desktop/enroll-second-password-errors', 'second-password-setup.png', phone],
      ['ja-desktop/menu-open', 'menu.png', desktop],
      ['ja-desktop/step-up', 'step-up.png', phone],
    ].map(([key, name, viewport]) => [key, { file: path.join(DOCS_SHOTS, name), viewport }]),
  );
}

async function teardown() {
  await env.browser?.close().catch(() => {});
  await stopChildren();
  await env.smtp?.close().catch(() => {});
  await env.rp?.close().catch(() => {});
  if (OPTS.verbose) {
    for (const inst of [env.main, env.short, env.ldap]) {
      if (inst?.logPath) console.log(`\n# server log (${inst.name})\n${inst.logTail(200)}`);
    }
  }
  if (OPTS.keep) console.log(`\nkept: ${tempDirs.join(' ')}`);
  else for (const d of tempDirs) fs.rmSync(d, { recursive: true, force: true });
}

async function main() {
  const started = Date.now();
  const watchdog = setTimeout(() => {
    console.log(`\n  FAIL  the suite did not finish within ${WATCHDOG_MS / 60_000} minutes`);
    counts.failed++;
    killChildrenNow();
    console.log(`\n${closingLine()}`);
    process.exit(1);
  }, WATCHDOG_MS);
  watchdog.unref();
  for (const sig of ['SIGINT', 'SIGTERM']) {
    process.on(sig, () => {
      killChildrenNow();
      process.exit(130);
    });
  }
  process.on('exit', killChildrenNow);

  if (OPTS.docs) env.shots.docs = docsShots();
  fs.rmSync(SHOTS, { recursive: true, force: true });
  fs.mkdirSync(SHOTS, { recursive: true });
  const bin = findBinary();
  try {
    await setup(bin);
    await canary();
    await runFull(PROFILES.jaDesktop);
    await runFull(PROFILES.enPhone);
    await runSmoke(PROFILES.jaPhone);
    await runSmoke(PROFILES.enDesktop);
    await runNoJs();
  } finally {
    await teardown();
  }
  clearTimeout(watchdog);
  console.log(`\n(${((Date.now() - started) / 1000).toFixed(0)} s; screenshots in ${path.relative(process.cwd(), SHOTS) || SHOTS})`);
  console.log(`\n${closingLine()}`);
  process.exit(counts.failed > 0 ? 1 : 0);
}

main().catch((e) => {
  console.log(`  FAIL  the suite crashed: ${e?.stack ?? e}`);
  counts.failed++;
  killChildrenNow();
  console.log(`\n${closingLine()}`);
  process.exit(1);
});
