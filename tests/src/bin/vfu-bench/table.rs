//! Markdown tables, printed and written to the report alike.

/// A table: a heading line, a note under it, columns and rows of cells.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Heading (rendered as `### heading`; empty for none).
    pub title: String,
    /// What the table measures and how (a paragraph under the heading).
    pub note: String,
    /// Column names; a name starting with `>` is right-aligned (the `>` is dropped).
    pub columns: Vec<String>,
    /// Rows of cells.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with `columns` (see [`Table::columns`] for alignment).
    pub fn new(title: &str, note: &str, columns: &[&str]) -> Self {
        Self {
            title: title.to_string(),
            note: note.to_string(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The header and rows only.
    pub fn grid(&self) -> String {
        let mut out = String::from("|");
        for c in &self.columns {
            out.push_str(&format!(" {} |", c.trim_start_matches('>')));
        }
        out.push_str("\n|");
        for c in &self.columns {
            out.push_str(if c.starts_with('>') { "---:|" } else { "---|" });
        }
        out.push('\n');
        for r in &self.rows {
            out.push('|');
            for cell in r {
                out.push_str(&format!(" {} |", cell.replace('|', "\\|")));
            }
            out.push('\n');
        }
        out
    }

    /// Heading, note and grid.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        if !self.title.is_empty() {
            out.push_str(&format!("### {}\n\n", self.title));
        }
        if !self.note.is_empty() {
            out.push_str(&self.note);
            out.push_str("\n\n");
        }
        out.push_str(&self.grid());
        out
    }
}

/// `x` with `digits` decimals, or "-" when it is not a number.
pub fn num(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "-".into()
    }
}

/// A ratio as "1.23x".
pub fn ratio(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}x")
    } else {
        "-".into()
    }
}

/// Operations per second, with a thousands grouping that reads at a glance.
pub fn rate(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_markdown() {
        let mut t = Table::new("T", "", &["a", ">b"]);
        t.row(vec!["x|y".into(), "1".into()]);
        assert_eq!(
            t.markdown(),
            "### T\n\n| a | b |\n|---|---:|\n| x\\|y | 1 |\n"
        );
        assert_eq!(rate(1234567.4), "1 234 567");
        assert_eq!(rate(999.0), "999");
        assert_eq!(ratio(f64::NAN), "-");
    }
}
