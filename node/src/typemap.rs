//! The cross-engine type mapping, in one place: which engine type is
//! captured as which mesh [`Value`], what each engine writes a mesh value
//! as, and what is lossy or refused. [`MAPPINGS`] is the table; README.md
//! shows it (between `<!-- typemap:begin -->` and `<!-- typemap:end -->`),
//! and a test fails when the two differ (`cargo test -p syncmesh-node
//! typemap` prints the table to paste). The adapters' codecs implement the
//! table (each adapter's module docs give its exact encodings), and the
//! integer range rule every SQL target shares lives here
//! ([`check_int_column`]).

use syncmesh_resolver::Value;

/// One mesh value and the engine types that carry it.
#[derive(Clone, Copy, Debug)]
pub struct Mapping {
    /// The mesh value.
    pub value: &'static str,
    /// SQLite (storage class; declared types only give affinity).
    pub sqlite: &'static str,
    /// PostgreSQL types captured as this value.
    pub postgresql: &'static str,
    /// MySQL / MariaDB types captured as this value.
    pub mysql: &'static str,
    /// MongoDB (BSON) types.
    pub mongodb: &'static str,
    /// What a Redis hash field holds.
    pub redis: &'static str,
    /// Lossy conversions and refusals.
    pub lossy_or_refused: &'static str,
}

/// The table (see the module docs).
pub const MAPPINGS: &[Mapping] = &[
    Mapping {
        value: "`Null`",
        sqlite: "NULL",
        postgresql: "NULL",
        mysql: "NULL",
        mongodb: "null (a missing field reads as `Null` too)",
        redis: "field absent",
        lossy_or_refused: "into a NOT NULL column: refused by the database (the apply fails with its error)",
    },
    Mapping {
        value: "`Bool`",
        sqlite: "INTEGER 0 / 1",
        postgresql: "`boolean`",
        mysql: "`bit(1)` (`tinyint(1)`/`bool` is an `Int`)",
        mongodb: "boolean",
        redis: "`true` / `false`",
        lossy_or_refused: "into an integer column: 0 / 1",
    },
    Mapping {
        value: "`Int` (i64)",
        sqlite: "INTEGER",
        postgresql: "`smallint`, `integer`, `bigint`",
        mysql: "`tinyint`..`bigint`, `year` (signed, and unsigned up to 2^63 - 1)",
        mongodb: "int32, int64 (written as int64)",
        redis: "decimal text",
        lossy_or_refused: "into a narrower integer column (e.g. `bigint` into PostgreSQL `integer`): refused when out of range, the error names table, column and value",
    },
    Mapping {
        value: "`Decimal` (exact text)",
        sqlite: "TEXT (NUMERIC affinity may turn it into a number)",
        postgresql: "`numeric`",
        mysql: "`decimal`, `numeric`; `bigint unsigned` above 2^63 - 1",
        mongodb: "decimal128",
        redis: "the text",
        lossy_or_refused: "an integral value into an integer column outside its range (e.g. unsigned bigint 18446744073709551615 into PostgreSQL `bigint`): refused, the error names table, column and value (use `numeric(20,0)`); into a float column: rounded to the nearest float",
    },
    Mapping {
        value: "`Float` (f64)",
        sqlite: "REAL (captured exactly)",
        postgresql: "`real`, `double precision`",
        mysql: "`float`, `double`",
        mongodb: "double",
        redis: "shortest exact text",
        lossy_or_refused: "into `real` / MySQL `float`: rounded to single precision; NaN and ±infinity: refused by MySQL / MariaDB",
    },
    Mapping {
        value: "`Text`",
        sqlite: "TEXT",
        postgresql: "`text`, `varchar`, `char(n)`, `name`, `date`, `time`, `interval`, `uuid`, enums, arrays (as their literal)",
        mysql: "`char`, `varchar`, `*text`, `enum`, `set`, `date`, `time`; a zero `datetime`",
        mongodb: "string; an ObjectId `_id` as its 24 hex digits",
        redis: "the text",
        lossy_or_refused: "into a typed column (date, uuid, enum, …): parsed by the database, refused when it does not parse; a MongoDB `_id` text of 24 lowercase hex digits is written as an ObjectId",
    },
    Mapping {
        value: "`Bytes`",
        sqlite: "BLOB",
        postgresql: "`bytea`",
        mysql: "`binary`, `varbinary`, `*blob`",
        mongodb: "binary (subtype 0)",
        redis: "the bytes",
        lossy_or_refused: "into a text column: refused unless UTF-8",
    },
    Mapping {
        value: "`Json` (text)",
        sqlite: "TEXT",
        postgresql: "`json`, `jsonb`",
        mysql: "`json` (MariaDB: `longtext` with `JSON_VALID`)",
        mongodb: "embedded document, array (relaxed Extended JSON); other BSON types (an ObjectId outside `_id`, regex, timestamp, non-generic binary) as canonical Extended JSON",
        redis: "the JSON text",
        lossy_or_refused: "`jsonb` and MySQL normalise spacing and key order; into MongoDB: refused unless valid (Extended) JSON",
    },
    Mapping {
        value: "`Timestamp` (µs since the epoch, UTC)",
        sqlite: "INTEGER (µs)",
        postgresql: "`timestamp`, `timestamptz` (±infinity as i64 max / min)",
        mysql: "`datetime`, `timestamp`",
        mongodb: "date (ms)",
        redis: "RFC 3339 text",
        lossy_or_refused: "into `date`: the time of day is dropped; into MySQL `timestamp`: refused outside 1970-2038 (strict mode, the default); into MongoDB: refused with sub-millisecond digits",
    },
];

/// The README table of [`MAPPINGS`].
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| mesh value | SQLite | PostgreSQL | MySQL / MariaDB | MongoDB | Redis | lossy or refused |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for m in MAPPINGS {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            m.value, m.sqlite, m.postgresql, m.mysql, m.mongodb, m.redis, m.lossy_or_refused
        ));
    }
    out
}

/// The range of an integer column from its declared type, by name
/// (`smallint`/`int2`, `integer`/`int`/`int4`, `bigint`/`int8`, MySQL's
/// `tinyint`..`bigint` with `unsigned`), or `None` for other types.
pub fn int_range(decl: &str) -> Option<(i128, i128)> {
    let lower = decl.to_ascii_lowercase();
    let base: String = lower
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let unsigned = lower.contains("unsigned");
    let bits: u32 = match base.as_str() {
        "tinyint" => 8,
        "smallint" | "int2" => 16,
        "mediumint" => 24,
        "int" | "integer" | "int4" => 32,
        "bigint" | "int8" => 64,
        _ => return None,
    };
    Some(if unsigned {
        (0, (1i128 << bits) - 1)
    } else {
        (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
    })
}

/// Refuses an integral value that an integer column (declared `decl`)
/// cannot hold, with a message naming column and value and what to do
/// (the caller's `Error::Schema` names the table). Other values and other
/// columns pass (the adapter converts them).
pub fn check_int_column(column: &str, decl: &str, v: &Value) -> Result<(), String> {
    let Some((lo, hi)) = int_range(decl) else {
        return Ok(());
    };
    let n: i128 = match v {
        Value::Int(i) => i128::from(*i),
        Value::Decimal(s) => match s.parse::<i128>() {
            Ok(n) => n,
            // Longer than i128 (or not integral: the database decides).
            Err(_) if s.bytes().all(|b| b.is_ascii_digit() || b == b'-') && s.len() > 1 => {
                return Err(out_of_range(column, decl, s, lo, hi));
            }
            Err(_) => return Ok(()),
        },
        _ => return Ok(()),
    };
    if n < lo || n > hi {
        return Err(out_of_range(column, decl, &n.to_string(), lo, hi));
    }
    Ok(())
}

fn out_of_range(column: &str, decl: &str, value: &str, lo: i128, hi: i128) -> String {
    format!(
        "column {column} ({decl}): the value {value} is out of range ({lo}..={hi}); \
         widen the column (e.g. numeric(20,0) for unsigned 64-bit values) or keep such values out of it"
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn readme_shows_exactly_this_table() {
        let readme = include_str!("../../README.md");
        let begin = "<!-- typemap:begin -->\n";
        let end = "<!-- typemap:end -->";
        let start = readme.find(begin).map(|i| i + begin.len());
        let stop = readme.find(end);
        let shown = match (start, stop) {
            (Some(a), Some(b)) if a <= b => &readme[a..b],
            _ => panic!(
                "README.md lacks the typemap markers; add:\n{begin}{}{end}",
                markdown_table()
            ),
        };
        assert_eq!(
            shown,
            markdown_table(),
            "README.md's type-mapping table differs from node/src/typemap.rs; paste:\n{}",
            markdown_table()
        );
    }

    #[test]
    fn every_mysql_type_in_the_table_is_supported_by_the_adapter() {
        for m in MAPPINGS {
            for ty in m.mysql.split('`').skip(1).step_by(2) {
                let ty = ty.trim_end_matches("..");
                if ty.contains('*') || ty.starts_with("tinyint(1)") || ty == "bool" {
                    continue;
                }
                let probe = match ty {
                    "bigint unsigned" => "bigint(20) unsigned".to_owned(),
                    "decimal" | "numeric" => format!("{ty}(10,2)"),
                    other => other.to_owned(),
                };
                assert!(
                    crate::mysql::kind_of_decl(&probe).is_some(),
                    "the table names MySQL type {ty}, which the adapter refuses"
                );
            }
        }
    }

    #[test]
    fn integer_columns_refuse_out_of_range_values_by_name() {
        assert_eq!(
            int_range("bigint"),
            Some((i64::MIN.into(), i64::MAX.into()))
        );
        assert_eq!(int_range("bigint(20) unsigned"), Some((0, u64::MAX.into())));
        assert_eq!(
            int_range("integer"),
            Some((i32::MIN.into(), i32::MAX.into()))
        );
        assert_eq!(int_range("smallint"), Some((-32768, 32767)));
        assert_eq!(int_range("numeric(20,0)"), None);
        assert_eq!(int_range("text"), None);
        let big = Value::Decimal("18446744073709551615".into());
        let e = check_int_column("n", "bigint", &big).unwrap_err();
        assert!(
            e.contains("column n")
                && e.contains("18446744073709551615")
                && e.contains("numeric(20,0)"),
            "{e}"
        );
        assert!(check_int_column("n", "bigint(20) unsigned", &big).is_ok());
        assert!(check_int_column("n", "numeric(20,0)", &big).is_ok());
        assert!(check_int_column("c", "integer", &Value::Int(i64::from(i32::MAX) + 1)).is_err());
        assert!(check_int_column("c", "integer", &Value::Int(i64::from(i32::MAX))).is_ok());
        assert!(check_int_column("c", "bigint", &Value::Decimal("9".repeat(50))).is_err());
        assert!(check_int_column("c", "bigint", &Value::Decimal("1.5".into())).is_ok());
        assert!(check_int_column("c", "bigint", &Value::Text("x".into())).is_ok());
    }
}
