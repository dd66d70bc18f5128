// A small Markdown renderer for chat answers, written for this page (no dependency).
// It builds DOM nodes (never innerHTML), so model output cannot inject markup. Supported:
// fenced code (highlighted, with a copy button), headings, paragraphs, hard line breaks,
// lists (nested by indentation), block quotes, tables, rules, `code`, **bold**, *italic*,
// ~~strike~~ and [links](https://...) (http, https and mailto only). An unclosed fence (an
// answer still streaming) renders as code up to the end.
"use strict";

(() => {
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  // --- code highlighting: one pass of a sticky regex per language family ---------------------
  const KEYWORDS = {
    python:
      "and as assert async await break class continue def del elif else except False finally for from global if import in is lambda None nonlocal not or pass raise return True try while with yield match case self print",
    js: "async await break case catch class const continue debugger default delete do else export extends false finally for function if import in instanceof let new null of return static super switch this throw true try typeof undefined var void while yield interface type enum implements",
    c: "auto break case char const continue default do double else enum extern float for goto if inline int long register return short signed sizeof static struct switch typedef union unsigned void volatile while bool true false nullptr class public private protected template typename namespace using new delete virtual override std include define",
    rust: "as async await break const continue crate else enum extern false fn for if impl in let loop match mod move mut pub ref return self Self static struct super trait true type unsafe use where while Some None Ok Err",
    go: "break case chan const continue default defer else fallthrough for func go goto if import interface map package range return select struct switch type var nil true false",
    shell: "if then else elif fi for while do done case esac function in export local return echo cd sudo",
    sql: "select from where insert into values update set delete create table drop alter join left right inner outer on group by order having limit and or not null as distinct",
  };
  const FAMILY = {
    py: "python", python: "python", js: "js", javascript: "js", ts: "js", typescript: "js",
    jsx: "js", tsx: "js", json: "js", java: "c", c: "c", cpp: "c", "c++": "c", h: "c",
    cs: "c", csharp: "c", swift: "c", kotlin: "c", rust: "rust", rs: "rust", go: "go",
    sh: "shell", bash: "shell", shell: "shell", zsh: "shell", console: "shell", sql: "sql",
  };
  const HASH_COMMENTS = new Set(["python", "shell"]);
  const SETS = {};
  for (const [k, v] of Object.entries(KEYWORDS)) SETS[k] = new Set(v.split(" "));

  function highlight(code, lang) {
    const family = FAMILY[(lang || "").toLowerCase()];
    const out = document.createDocumentFragment();
    if (!family) {
      out.append(code);
      return out;
    }
    const comment = HASH_COMMENTS.has(family)
      ? "#[^\\n]*"
      : family === "sql"
        ? "--[^\\n]*"
        : "\\/\\/[^\\n]*|\\/\\*[\\s\\S]*?(?:\\*\\/|$)";
    const strings = family === "python" ? "(?:[rRbBfF]{0,2})(?:\"\"\"[\\s\\S]*?(?:\"\"\"|$)|'''[\\s\\S]*?(?:'''|$))|" : "";
    const re = new RegExp(
      `(${comment})|(${strings}"(?:\\\\.|[^"\\\\\\n])*"?|'(?:\\\\.|[^'\\\\\\n])*'?|\`(?:\\\\.|[^\`\\\\])*\`?)` +
        "|(\\b\\d[\\d_]*(?:\\.\\d+)?(?:[eE][+-]?\\d+)?\\b|\\b0x[0-9a-fA-F]+\\b)|([A-Za-z_$][\\w$]*)",
      "g",
    );
    const words = SETS[family];
    let last = 0;
    for (const m of code.matchAll(re)) {
      let cls = null;
      if (m[1]) cls = "tok-com";
      else if (m[2]) cls = "tok-str";
      else if (m[3]) cls = "tok-num";
      else if (words.has(m[4])) cls = "tok-kw";
      if (!cls) continue;
      if (m.index > last) out.append(code.slice(last, m.index));
      out.append(el("span", cls, m[0]));
      last = m.index + m[0].length;
    }
    if (last < code.length) out.append(code.slice(last));
    return out;
  }

  function codeBlock(code, lang) {
    const box = el("div", "code");
    const head = el("div", "code-head");
    head.append(el("span", "code-lang", lang || "text"));
    const copy = el("button", "copy", "Copy");
    copy.type = "button";
    head.append(copy);
    const pre = el("pre");
    const c = el("code");
    c.append(highlight(code, lang));
    pre.append(c);
    box.append(head, pre);
    return box;
  }

  // --- inline ---------------------------------------------------------------------------------
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\*\*([\s\S]+?)\*\*|__([\s\S]+?)__|~~([\s\S]+?)~~|\*([^\s*](?:[\s\S]*?[^\s*])?)\*|(?<![\w])_([^\s_](?:[\s\S]*?[^\s_])?)_(?![\w])|\[([^\]\n]+)\]\(([^)\s]+)\)|\n/g;

  function inline(text, parent) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > last) parent.append(text.slice(last, m.index));
      last = m.index + m[0].length;
      if (m[1]) parent.append(el("code", null, m[2].replace(/^ (.*) $/s, "$1")));
      else if (m[3] !== undefined || m[4] !== undefined) inline(m[3] ?? m[4], parent.appendChild(el("strong")));
      else if (m[5] !== undefined) inline(m[5], parent.appendChild(el("del")));
      else if (m[6] !== undefined || m[7] !== undefined) inline(m[6] ?? m[7], parent.appendChild(el("em")));
      else if (m[8] !== undefined) {
        if (/^(https?:|mailto:)/i.test(m[9])) {
          const a = el("a");
          a.href = m[9];
          a.target = "_blank";
          a.rel = "noopener noreferrer";
          inline(m[8], a);
          parent.append(a);
        } else parent.append(m[0]);
      } else parent.append(el("br"));
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  // --- blocks ---------------------------------------------------------------------------------
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
  const ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const TABLE_SEP = /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/;

  const cells = (line) =>
    line
      .trim()
      .replace(/^\||\|$/g, "")
      .split("|")
      .map((c) => c.trim());

  function blocks(lines, parent) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) {
        i++;
      } else if ((m = line.match(FENCE))) {
        const close = new RegExp(`^ {0,3}${m[1][0]}{${m[1].length},}\\s*$`);
        const body = [];
        for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
        i++;
        parent.append(codeBlock(body.join("\n"), m[2]));
      } else if ((m = line.match(HEADING))) {
        inline(m[2], parent.appendChild(el(`h${m[1].length}`)));
        i++;
      } else if (RULE.test(line)) {
        parent.append(el("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const body = [];
        for (; i < lines.length && (m = lines[i].match(QUOTE)); i++) body.push(m[1]);
        blocks(body, parent.appendChild(el("blockquote")));
      } else if ((m = line.match(ITEM))) {
        i = list(lines, i, parent);
      } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])) {
        const table = el("table");
        const tr = table.appendChild(el("thead")).appendChild(el("tr"));
        for (const c of cells(line)) inline(c, tr.appendChild(el("th")));
        const body = table.appendChild(el("tbody"));
        for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i++) {
          const row = body.appendChild(el("tr"));
          for (const c of cells(lines[i])) inline(c, row.appendChild(el("td")));
        }
        const wrap = el("div", "table");
        wrap.append(table);
        parent.append(wrap);
      } else {
        const body = [];
        for (; i < lines.length; i++) {
          const l = lines[i];
          if (!l.trim() || FENCE.test(l) || HEADING.test(l) || QUOTE.test(l) || RULE.test(l)) break;
          if (body.length && ITEM.test(l)) break;
          body.push(l);
        }
        inline(body.join("\n"), parent.appendChild(el("p")));
      }
    }
  }

  function list(lines, i, parent) {
    const first = lines[i].match(ITEM);
    const indent = first[1].length;
    const ordered = /\d/.test(first[2]);
    const ol = el(ordered ? "ol" : "ul");
    if (ordered && parseInt(first[2], 10) !== 1) ol.start = parseInt(first[2], 10);
    while (i < lines.length) {
      const m = lines[i].match(ITEM);
      if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
      const body = [m[3]];
      for (i++; i < lines.length; i++) {
        const l = lines[i];
        const sub = l.match(ITEM);
        if (sub && sub[1].length <= indent) break;
        if (!l.trim()) {
          const next = lines[i + 1] ?? "";
          if (next.trim() && next.length - next.trimStart().length > indent) {
            body.push("");
            continue;
          }
          break;
        }
        if (!/^\s/.test(l) && !sub && (FENCE.test(l) || HEADING.test(l) || QUOTE.test(l))) break;
        body.push(l.replace(new RegExp(`^\\s{0,${indent + 2 + (ordered ? 2 : 0)}}`), ""));
      }
      const li = ol.appendChild(el("li"));
      // a single-paragraph item is rendered without its <p>
      const inner = document.createDocumentFragment();
      blocks(body, inner);
      if (inner.childNodes.length === 1 && inner.firstChild.tagName === "P") li.append(...inner.firstChild.childNodes);
      else li.append(inner);
      while (i < lines.length && !lines[i].trim()) {
        const next = lines[i + 1];
        if (next === undefined || !next.match(ITEM) || next.match(ITEM)[1].length !== indent) break;
        i++;
      }
    }
    parent.append(ol);
    return i;
  }

  /** The Markdown `text` as a DocumentFragment. */
  function renderMarkdown(text) {
    const frag = document.createDocumentFragment();
    blocks(text.replace(/\r\n?/g, "\n").split("\n"), frag);
    return frag;
  }

  window.renderMarkdown = renderMarkdown;
  window.highlightCode = highlight;
})();
