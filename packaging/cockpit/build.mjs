// Builds the Cockpit page into target/cockpit/modvisor/ (what packages install to
// /usr/share/cockpit/modvisor/): manifest.json and index.html as they are, the page's
// JavaScript and CSS (a subset of PatternFly's) bundled and minified by esbuild, and gzipped
// the way Cockpit ships its own assets (cockpit-bridge serves NAME.gz for NAME).
//   node build.mjs [OUTDIR]
import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = path.dirname(fileURLToPath(import.meta.url));
const src = path.join(here, "modvisor");
const out = path.resolve(process.argv[2] || path.join(here, "../../target/cockpit/modvisor"));

fs.rmSync(out, { recursive: true, force: true });
fs.mkdirSync(out, { recursive: true });

const result = await esbuild.build({
    entryPoints: { modvisor: path.join(src, "src/index.js") },
    bundle: true,
    minify: true,
    format: "iife",
    target: ["es2020"],
    outdir: out,
    // PatternFly's background images are referenced by tokens this page never uses.
    external: ["*.svg", "*.woff2"],
    legalComments: "none",
    metafile: true,
    logLevel: "warning",
});

for (const f of ["manifest.json", "index.html"])
    fs.copyFileSync(path.join(src, f), path.join(out, f));

for (const f of ["modvisor.js", "modvisor.css"]) {
    const p = path.join(out, f);
    const data = fs.readFileSync(p);
    fs.writeFileSync(p + ".gz", zlib.gzipSync(data, { level: 9 }));
    fs.rmSync(p);
}

for (const f of fs.readdirSync(out).sort())
    console.log(`${path.join(out, f)}\t${fs.statSync(path.join(out, f)).size} bytes`);
if (Object.keys(result.metafile.outputs).length !== 2)
    throw new Error("expected exactly modvisor.js and modvisor.css");
