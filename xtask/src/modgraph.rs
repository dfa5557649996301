//! The import graph of the reference kernel's modules (`kernel/src`), and
//! its cycles. Issue 9 asks for no circular imports among the kernel's
//! modules; the unit test below keeps it that way.
//!
//! A module is a top-level file (`mm.rs` → `mm`) or directory
//! (`selftest/` → `selftest`); `main.rs` is the root and may use anything.
//! An edge `a → b` is any `crate::b` path, or `b` inside a `use crate::{..}`
//! group, in a file of `a` (comments ignored).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module → the modules it imports.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The import graph of the `.rs` files under `src` (the crate root excluded).
pub fn kernel_graph(src: &Path) -> std::io::Result<Graph> {
    let mut files = Vec::new();
    collect(src, &mut files)?;
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(src).unwrap_or(&file);
        let first = rel.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if module == "main" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file)?;
        let deps = graph.entry(module.clone()).or_default();
        deps.extend(imports(&text).into_iter().filter(|d| *d != module));
    }
    let known: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| known.contains(d));
    }
    Ok(graph)
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The first path segments after `crate::` in `text`, comments removed.
pub fn imports(text: &str) -> BTreeSet<String> {
    let code: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        // `$crate::` (macros) is the crate of the macro, not a module edge.
        let preceded_by_dollar = i > 0 && rest.as_bytes()[i - 1] == b'$';
        rest = &rest[i + "crate::".len()..];
        if preceded_by_dollar {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        push_first(&item, &mut out);
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            push_first(&item, &mut out);
        } else {
            push_first(rest, &mut out);
        }
    }
    out
}

fn push_first(path: &str, out: &mut BTreeSet<String>) {
    let name: String = path.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    if !name.is_empty() && name != "self" && name.chars().next().is_some_and(|c| c.is_lowercase()) {
        out.insert(name);
    }
}

/// The strongly connected components with more than one module (Tarjan).
pub fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_of_paths_and_groups() {
        let text = "use crate::{apic, mm::{A, B}, self};\nfn f() { crate::cet::rdssp(); } // crate::gone\n\
                    macro_rules! m { () => { $crate::x::y } }";
        let got: Vec<String> = imports(text).into_iter().collect();
        assert_eq!(got, ["apic", "cet", "mm"]);
    }

    #[test]
    fn a_cycle_is_found() {
        let mut g = Graph::new();
        g.entry("a".into()).or_default().insert("b".into());
        g.entry("b".into()).or_default().insert("c".into());
        g.entry("c".into()).or_default().insert("a".into());
        g.entry("d".into()).or_default().insert("a".into());
        assert_eq!(cycles(&g), vec![vec!["a".to_string(), "b".into(), "c".into()]]);
        g.get_mut("c").unwrap().clear();
        assert!(cycles(&g).is_empty());
    }

    /// Issue 9: no circular imports among the reference kernel's modules.
    #[test]
    fn the_kernel_modules_import_no_cycle() {
        let src = crate::kernel::kernel_dir().join("src");
        let graph = kernel_graph(&src).expect("read kernel/src");
        assert!(graph.len() > 10, "found only {} modules in {}", graph.len(), src.display());
        let found = cycles(&graph);
        assert!(found.is_empty(), "circular imports among kernel modules: {found:?}\ngraph: {graph:#?}");
    }
}
