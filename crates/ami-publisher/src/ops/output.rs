//! What the operations print: typed rows that know their columns, shown as
//! a table (one line per row, after the target) or as JSON, and written as
//! CSV. A row type is declared with [`row!`]: its table columns are its
//! first fields, so a column cannot name a field that is not there.

use serde::Serialize;

use super::Report;

/// A record an operation reports.
pub trait Row: Serialize {
    /// Column names, in order (shown upper-case in tables).
    const COLUMNS: &'static [&'static str];
    /// This record's cells, one per column.
    fn cells(&self) -> Vec<String>;
}

/// A value as a table or CSV cell ("" for nothing; tables show "-").
pub trait Cell {
    fn cell(&self) -> String;
}

impl Cell for String {
    fn cell(&self) -> String {
        self.clone()
    }
}

impl Cell for bool {
    fn cell(&self) -> String {
        self.to_string()
    }
}

impl Cell for u64 {
    fn cell(&self) -> String {
        self.to_string()
    }
}

impl Cell for usize {
    fn cell(&self) -> String {
        self.to_string()
    }
}

impl<T: Cell> Cell for Option<T> {
    fn cell(&self) -> String {
        self.as_ref().map(Cell::cell).unwrap_or_default()
    }
}

/// Declare a row type: `columns` are shown in tables and CSV (in this
/// order) and serialised; `extra` fields are serialised only.
macro_rules! row {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            columns { $( $(#[$cmeta:meta])* $col:ident : $cty:ty ),* $(,)? }
            extra { $( $(#[$emeta:meta])* $extra:ident : $ety:ty ),* $(,)? }
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, serde::Serialize)]
        pub struct $name {
            $( $(#[$cmeta])* pub $col: $cty, )*
            $( $(#[$emeta])* pub $extra: $ety, )*
        }

        impl $crate::ops::output::Row for $name {
            const COLUMNS: &'static [&'static str] = &[$(stringify!($col)),*];
            fn cells(&self) -> Vec<String> {
                vec![$($crate::ops::output::Cell::cell(&self.$col)),*]
            }
        }
    };
}
pub(crate) use row;

row! {
    /// A change an operation made (or, with --dry-run, would make).
    pub struct Acted {
        columns { action: String, resource: String, detail: String }
        extra {}
    }
}

impl Acted {
    /// A change left undone on purpose, and why.
    pub fn kept(resource: &str, why: &str) -> Acted {
        Acted { action: "kept".into(), resource: resource.into(), detail: why.into() }
    }
}

/// Print reports: JSON, or a table with the row's columns (after TARGET)
/// and one line per record; failed targets are listed after. `quiet`:
/// print nothing when no target has a record or an error (for cron).
pub fn print<R: Row>(reports: &[Report<R>], json: bool, quiet: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(reports).expect("rows serialise"));
        return;
    }
    let any = reports.iter().any(|r| !r.records.is_empty() || r.error.is_some());
    if quiet && !any {
        return;
    }
    let mut rows =
        vec![std::iter::once("TARGET".to_owned()).chain(R::COLUMNS.iter().map(|c| c.to_uppercase())).collect()];
    for r in reports {
        for rec in &r.records {
            let mut row = vec![format!("{},{}", r.account, r.region)];
            row.extend(rec.cells().into_iter().map(|c| if c.is_empty() { "-".to_owned() } else { c }));
            rows.push(row);
        }
    }
    for line in table_lines(&rows) {
        println!("{line}");
    }
    for r in reports.iter().filter(|r| r.error.is_some()) {
        println!("{},{}: FAILED: {}", r.account, r.region, r.error.as_deref().unwrap_or(""));
    }
}

/// Rows as left-aligned columns two spaces apart.
fn table_lines(rows: &[Vec<String>]) -> Vec<String> {
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|row| {
            let line: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            line.join("  ").trim_end().to_owned()
        })
        .collect()
}

/// Write `columns` (a subset of the row's, in any order) of every record,
/// after account and region, as CSV, atomically. A column the row does not
/// have is an error, before anything is written.
pub fn write_csv<R: Row>(path: &std::path::Path, reports: &[Report<R>], columns: &[&str]) -> anyhow::Result<()> {
    let index: Vec<usize> = columns
        .iter()
        .map(|c| {
            R::COLUMNS
                .iter()
                .position(|k| k == c)
                .ok_or_else(|| anyhow::anyhow!("no column '{c}' in these rows (they have {})", R::COLUMNS.join(", ")))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut w = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(Vec::new());
    w.write_record(["account", "region"].iter().chain(columns))?;
    for r in reports {
        for rec in &r.records {
            let cells = rec.cells();
            let picked = index.iter().map(|&i| cells[i].as_str());
            w.write_record([r.account.as_str(), r.region.as_str()].into_iter().chain(picked))?;
        }
    }
    let text = w.into_inner().map_err(|e| anyhow::anyhow!("CSV of {}: {}", path.display(), e.error()))?;
    crate::results::write_atomic(path, &text)
}

#[cfg(test)]
#[allow(unreachable_pub)]
mod tests {
    use super::*;

    row! {
        pub struct Sample {
            columns { name: String, size: Option<u64>, ok: bool }
            extra { hidden: String }
        }
    }

    fn reports() -> Vec<Report<Sample>> {
        vec![Report {
            account: "a".into(),
            region: "r".into(),
            records: vec![Sample { name: "x,y".into(), size: None, ok: true, hidden: "h".into() }],
            error: None,
        }]
    }

    #[test]
    fn columns_are_the_declared_fields_and_extras_are_json_only() {
        assert_eq!(Sample::COLUMNS, ["name", "size", "ok"]);
        let s = &reports()[0].records[0];
        assert_eq!(s.cells(), ["x,y", "", "true"]);
        let v = serde_json::to_value(s).unwrap();
        assert_eq!(v["hidden"], "h");
    }

    #[test]
    fn csv_takes_named_columns_and_refuses_unknown_ones() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.csv");
        write_csv(&p, &reports(), &["ok", "name"]).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "account,region,ok,name\na,r,true,\"x,y\"\n");
        let e = write_csv(&d.path().join("no.csv"), &reports(), &["nmae"]).unwrap_err();
        assert!(e.to_string().contains("no column 'nmae'"), "{e}");
        assert!(!d.path().join("no.csv").exists());
    }

    #[test]
    fn tables_pad_columns() {
        let rows = vec![vec!["TARGET".to_owned(), "NAME".to_owned()], vec!["a,r".to_owned(), "x".to_owned()]];
        assert_eq!(table_lines(&rows), ["TARGET  NAME", "a,r     x"]);
    }
}
