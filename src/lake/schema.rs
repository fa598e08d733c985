//! Table contracts from `schemas/`: what the job accepts as input and what
//! it promises to write. Inputs are checked against them here; outputs are
//! checked against them by the integration tests.

use arrow::datatypes::{DataType, Schema, TimeUnit};
use serde::Deserialize;

use crate::error::{Error, Result};

/// One column of a contract.
#[derive(Debug, Clone, Deserialize)]
pub struct ContractColumn {
    /// Column name.
    pub name: String,
    /// Type name (see `schemas/README.md`).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Whether the column must be present (inputs only).
    #[serde(default = "yes")]
    pub required: bool,
    /// Whether nulls are allowed.
    #[serde(default = "yes")]
    pub nullable: bool,
    /// What it holds.
    #[serde(default)]
    pub description: String,
}

fn yes() -> bool {
    true
}

/// A table contract.
#[derive(Debug, Clone, Deserialize)]
pub struct Contract {
    /// Table name.
    pub table: String,
    /// `input` or `output`.
    pub direction: String,
    /// Columns, in order.
    #[serde(default)]
    pub columns: Vec<ContractColumn>,
    /// Columns the rows are sorted by (ascending), outputs only; empty when
    /// the order is not part of the contract. Readers are told, so they
    /// stream the table instead of sorting it again.
    #[serde(default)]
    pub order: Vec<String>,
}

/// Every contract shipped in `schemas/`, by file name.
pub const CONTRACT_FILES: &[(&str, &str)] = &[
    (
        "interactions",
        include_str!("../../schemas/interactions.json"),
    ),
    ("items", include_str!("../../schemas/items.json")),
    (
        "item_content",
        include_str!("../../schemas/item_content.json"),
    ),
    ("split", include_str!("../../schemas/split.json")),
    ("item_map", include_str!("../../schemas/item_map.json")),
    ("user_map", include_str!("../../schemas/user_map.json")),
    (
        "item_popularity",
        include_str!("../../schemas/item_popularity.json"),
    ),
    ("stats", include_str!("../../schemas/stats.json")),
    (
        "transitions",
        include_str!("../../schemas/transitions.json"),
    ),
    (
        "cooccurrence",
        include_str!("../../schemas/cooccurrence.json"),
    ),
    (
        "item_text_embeddings",
        include_str!("../../schemas/item_text_embeddings.json"),
    ),
    (
        "recommendations",
        include_str!("../../schemas/recommendations.json"),
    ),
    ("evaluation", include_str!("../../schemas/evaluation.json")),
    ("ceiling", include_str!("../../schemas/ceiling.json")),
    ("training", include_str!("../../schemas/training.json")),
    (
        "soft_labels",
        include_str!("../../schemas/soft_labels.json"),
    ),
];

/// Loads the contract of `table`.
pub fn contract(table: &str) -> Result<Contract> {
    let text = CONTRACT_FILES
        .iter()
        .find(|(name, _)| *name == table)
        .map(|(_, text)| *text)
        .ok_or_else(|| Error::internal(format!("no contract for table {table}")))?;
    serde_json::from_str(text).map_err(|e| Error::internal(format!("schemas/{table}.json: {e}")))
}

/// The contract's name for an Arrow type.
pub fn type_name(data_type: &DataType) -> String {
    match data_type {
        DataType::Boolean => "bool".into(),
        DataType::Int8 => "int8".into(),
        DataType::Int16 => "int16".into(),
        DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::UInt8 => "uint8".into(),
        DataType::UInt16 => "uint16".into(),
        DataType::UInt32 => "uint32".into(),
        DataType::UInt64 => "uint64".into(),
        DataType::Float16 => "float16".into(),
        DataType::Float32 => "float32".into(),
        DataType::Float64 => "float64".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "utf8".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "binary".into(),
        DataType::Date32 => "date32".into(),
        DataType::Timestamp(unit, tz) => {
            let unit = match unit {
                TimeUnit::Second => "s",
                TimeUnit::Millisecond => "ms",
                TimeUnit::Microsecond => "us",
                TimeUnit::Nanosecond => "ns",
            };
            match tz {
                Some(tz) => format!("timestamp[{unit}, {}]", utc_name(tz)),
                None => format!("timestamp[{unit}]"),
            }
        }
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f) => {
            format!("list<{}>", type_name(f.data_type()))
        }
        DataType::FixedSizeList(f, n) => {
            format!("fixed_size_list<{}, {n}>", type_name(f.data_type()))
        }
        DataType::Dictionary(_, value) => type_name(value),
        other => other.to_string(),
    }
}

fn utc_name(tz: &str) -> &str {
    if is_utc(tz) { "UTC" } else { tz }
}

fn is_utc(tz: &str) -> bool {
    matches!(tz, "UTC" | "utc" | "+00:00" | "Z" | "Etc/UTC" | "GMT")
}

/// Id column types the job accepts.
pub fn is_id_type(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Int32
            | DataType::Int64
            | DataType::UInt32
            | DataType::UInt64
            | DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
    )
}

/// Does `actual` satisfy the contract type `expected`? `id_type` is the
/// input's type for `id` columns of outputs (`None` when checking inputs).
pub fn type_matches(expected: &str, actual: &DataType, id_type: Option<&DataType>) -> bool {
    match expected {
        "id" => match id_type {
            Some(id) => type_name(id) == type_name(actual),
            None => is_id_type(actual),
        },
        "timestamp" => match actual {
            DataType::Timestamp(_, None) => true,
            DataType::Timestamp(_, Some(tz)) => is_utc(tz),
            _ => false,
        },
        "float32" => matches!(actual, DataType::Float32 | DataType::Float64),
        other => match other
            .strip_prefix("list<")
            .and_then(|s| s.strip_suffix('>'))
        {
            Some(inner) => match actual {
                DataType::List(f)
                | DataType::LargeList(f)
                | DataType::ListView(f)
                | DataType::LargeListView(f) => type_matches(inner, f.data_type(), id_type),
                _ => false,
            },
            None => type_name(actual) == other,
        },
    }
}

impl Contract {
    /// Checks an input file's schema: required columns present, types allowed.
    /// `file` names the file in the error.
    pub fn check_input(&self, file: &str, schema: &Schema) -> Result<()> {
        for column in &self.columns {
            match schema.field_with_name(&column.name) {
                Ok(field) => {
                    if !type_matches(&column.type_name, field.data_type(), None) {
                        return Err(Error::data(
                            file,
                            format!(
                                "column `{}` has type {}, but the {} contract (schemas/{}.json) requires {}",
                                column.name,
                                type_name(field.data_type()),
                                self.table,
                                self.table,
                                describe_type(&column.type_name)
                            ),
                        ));
                    }
                }
                Err(_) if column.required => {
                    let found: Vec<&str> =
                        schema.fields().iter().map(|f| f.name().as_str()).collect();
                    return Err(Error::data(
                        file,
                        format!(
                            "missing required column `{}` ({}); the file has columns {:?}",
                            column.name,
                            describe_type(&column.type_name),
                            found
                        ),
                    ));
                }
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Differences between a written table's schema and this contract; empty
    /// when they agree. `id_types` gives the input's user and item id types.
    pub fn output_mismatches(
        &self,
        schema: &Schema,
        user_id: &DataType,
        item_id: &DataType,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let expected: Vec<&str> = self.columns.iter().map(|c| c.name.as_str()).collect();
        if names != expected {
            problems.push(format!(
                "{}: columns {names:?}, contract {expected:?}",
                self.table
            ));
        }
        for column in &self.columns {
            let Ok(field) = schema.field_with_name(&column.name) else {
                continue;
            };
            let id_type = match column.name.as_str() {
                "user_id" => Some(user_id),
                _ => Some(item_id),
            };
            if !type_matches(&column.type_name, field.data_type(), id_type) {
                problems.push(format!(
                    "{}.{}: type {}, contract {}",
                    self.table,
                    column.name,
                    type_name(field.data_type()),
                    column.type_name
                ));
            }
        }
        problems
    }
}

fn describe_type(name: &str) -> String {
    match name {
        "id" => "an id: int32, int64, uint32, uint64 or utf8".into(),
        "timestamp" => "a timestamp (any unit), time zone UTC or none".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Field;
    use std::sync::Arc;

    #[test]
    fn every_contract_parses() {
        for (name, _) in CONTRACT_FILES {
            let c = contract(name).unwrap();
            assert_eq!(&c.table, name);
            assert!(!c.columns.is_empty());
        }
    }

    #[test]
    fn input_check_names_file_column_and_rule() {
        let c = contract("interactions").unwrap();
        let good = Schema::new(vec![
            Field::new("user_id", DataType::Int64, true),
            Field::new("item_id", DataType::Utf8, true),
            Field::new(
                "timestamp",
                DataType::Timestamp(TimeUnit::Millisecond, Some(Arc::from("UTC"))),
                true,
            ),
        ]);
        c.check_input("f.parquet", &good).unwrap();

        let missing = Schema::new(vec![Field::new("user_id", DataType::Int64, true)]);
        let err = c
            .check_input("f.parquet", &missing)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f.parquet") && err.contains("item_id") && err.contains("missing"),
            "{err}"
        );

        let wrong = Schema::new(vec![
            Field::new("user_id", DataType::Int64, true),
            Field::new("item_id", DataType::Int64, true),
            Field::new("timestamp", DataType::Utf8, true),
        ]);
        let err = c.check_input("g.parquet", &wrong).unwrap_err().to_string();
        assert!(
            err.contains("g.parquet") && err.contains("`timestamp`") && err.contains("utf8"),
            "{err}"
        );

        let local_tz = Schema::new(vec![
            Field::new("user_id", DataType::Int64, true),
            Field::new("item_id", DataType::Int64, true),
            Field::new(
                "timestamp",
                DataType::Timestamp(TimeUnit::Second, Some(Arc::from("+02:00"))),
                true,
            ),
        ]);
        assert!(c.check_input("h.parquet", &local_tz).is_err());
    }

    #[test]
    fn type_names() {
        assert_eq!(
            type_name(&DataType::Timestamp(
                TimeUnit::Microsecond,
                Some(Arc::from("+00:00"))
            )),
            "timestamp[us, UTC]"
        );
        let list = DataType::List(Arc::new(Field::new("item", DataType::Utf8View, true)));
        assert_eq!(type_name(&list), "list<utf8>");
        assert!(type_matches("list<utf8>", &list, None));
        assert!(type_matches("id", &DataType::Int64, Some(&DataType::Int64)));
        assert!(!type_matches("id", &DataType::Utf8, Some(&DataType::Int64)));
    }
}
