//! A table of text cells written as Markdown (for report.md and the terminal), CSV (for
//! spreadsheets) and LaTeX (booktabs, for the paper).

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextTable {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
    /// Per column: right-aligned (numbers) or left-aligned (names).
    pub numeric: Vec<bool>,
}

impl TextTable {
    fn right(&self, column: usize) -> bool {
        self.numeric.get(column).copied().unwrap_or(false)
    }

    /// A GitHub-flavoured Markdown table, padded so it also reads as plain text.
    pub fn markdown(&self) -> String {
        let cell = |s: &str| s.replace('|', "\\|");
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .map(|c| cell(c).chars().count())
            .collect();
        for row in &self.rows {
            for (i, v) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell(v).chars().count()).max(3);
                }
            }
        }
        let line = |cells: &mut dyn Iterator<Item = String>| {
            let cells: Vec<String> = cells
                .enumerate()
                .map(|(i, c)| {
                    let pad = widths[i].saturating_sub(c.chars().count());
                    if self.right(i) {
                        format!("{}{c}", " ".repeat(pad))
                    } else {
                        format!("{c}{}", " ".repeat(pad))
                    }
                })
                .collect();
            format!("| {} |", cells.join(" | "))
        };
        let mut out = vec![line(&mut self.columns.iter().map(|c| cell(c)))];
        out.push(format!(
            "|{}|",
            widths
                .iter()
                .enumerate()
                .map(|(i, w)| if self.right(i) {
                    format!("{}:", "-".repeat(w + 1))
                } else {
                    format!(":{}", "-".repeat(w + 1))
                })
                .collect::<Vec<_>>()
                .join("|")
        ));
        for row in &self.rows {
            out.push(line(
                &mut (0..widths.len()).map(|i| cell(row.get(i).map_or("", String::as_str))),
            ));
        }
        out.join("\n")
    }

    /// RFC 4180: fields with a comma, quote or line break are quoted, quotes doubled.
    pub fn csv(&self) -> String {
        let field = |s: &str| {
            if s.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let line = |cells: &[String]| cells.iter().map(|c| field(c)).collect::<Vec<_>>().join(",");
        let mut out = line(&self.columns);
        for row in &self.rows {
            out.push('\n');
            out.push_str(&line(row));
        }
        out.push('\n');
        out
    }

    /// A booktabs `tabular` with LaTeX's special characters escaped and ± and Δ as math.
    pub fn latex(&self) -> String {
        let align: String = (0..self.columns.len())
            .map(|i| if self.right(i) { 'r' } else { 'l' })
            .collect();
        let row = |cells: &[String]| {
            cells
                .iter()
                .map(|c| latex_escape(c))
                .collect::<Vec<_>>()
                .join(" & ")
                + r" \\"
        };
        let mut out = vec![
            format!(r"\begin{{tabular}}{{{align}}}"),
            r"\toprule".to_string(),
            row(&self.columns),
            r"\midrule".to_string(),
        ];
        out.extend(self.rows.iter().map(|r| row(r)));
        out.push(r"\bottomrule".into());
        out.push(r"\end{tabular}".into());
        out.join("\n") + "\n"
    }
}

fn latex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '\\' => out.push_str(r"\textbackslash{}"),
            '&' | '%' | '$' | '#' | '_' | '{' | '}' => {
                out.push('\\');
                out.push(c);
            }
            '~' => out.push_str(r"\textasciitilde{}"),
            '^' => out.push_str(r"\textasciicircum{}"),
            '±' => out.push_str(r"$\pm$"),
            'Δ' => out.push_str(r"$\Delta$"),
            '—' => out.push_str("---"),
            '−' => out.push('-'),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> TextTable {
        TextTable {
            columns: vec!["pruner".into(), "n".into(), "top1".into()],
            rows: vec![
                vec!["snip".into(), "3".into(), "0.9100 ± 0.0050".into()],
                vec!["a, b|c_d".into(), "2".into(), "—".into()],
            ],
            numeric: vec![false, true, true],
        }
    }

    #[test]
    fn markdown_aligns_numbers_right_and_escapes_pipes() {
        assert_eq!(
            table().markdown(),
            "| pruner    |   n |            top1 |\n\
             |:----------|----:|----------------:|\n\
             | snip      |   3 | 0.9100 ± 0.0050 |\n\
             | a, b\\|c_d |   2 |               — |"
        );
    }

    #[test]
    fn csv_quotes_only_what_needs_it() {
        assert_eq!(
            table().csv(),
            "pruner,n,top1\nsnip,3,0.9100 ± 0.0050\n\"a, b|c_d\",2,—\n"
        );
    }

    #[test]
    fn latex_escapes_and_sets_plus_minus_as_math() {
        let tex = table().latex();
        assert!(tex.starts_with("\\begin{tabular}{lrr}\n\\toprule\npruner & n & top1 \\\\\n"));
        assert!(
            tex.contains("snip & 3 & 0.9100 $\\pm$ 0.0050 \\\\"),
            "{tex}"
        );
        assert!(tex.contains("a, b|c\\_d & 2 & --- \\\\"), "{tex}");
        assert!(tex.ends_with("\\bottomrule\n\\end{tabular}\n"));
    }
}
