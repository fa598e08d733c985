//! Warm start: a model for today's catalogue begins where the model of the
//! same name in an earlier run ended. Item rows are carried over by item
//! id, not by index, because the two runs' item maps differ: an item still
//! in the catalogue keeps its learned row, a new item starts as in a cold
//! start, an item that left is dropped.

use std::collections::HashMap;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the catalogue changed between the earlier run and this one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemsCarried {
    /// Items in both catalogues: their rows are copied.
    pub kept: usize,
    /// Items only in this run's catalogue: their rows start fresh.
    pub added: usize,
    /// Items only in the earlier catalogue: their rows are dropped.
    pub dropped: usize,
}

/// Where a warm-started model began, kept in its card
/// (`warm_started_from`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmOrigin {
    /// Run id of the earlier run.
    pub run_id: String,
    /// Its run date, `YYYY-MM-DD`.
    pub run_date: String,
    /// The earlier model's name.
    pub model: String,
    /// SHA-256 of the earlier model's file, as its run's manifest lists it.
    pub sha256: String,
    /// How the catalogue changed.
    #[serde(flatten)]
    pub items: ItemsCarried,
}

/// For each item of this run (`new_ids`, by item index), its index in the
/// earlier run's catalogue (`old_ids`), matched by id. The two id columns
/// must have one type (both integers or both strings): ids of another type
/// name other items.
pub fn carry_items(
    old_ids: &ArrayRef,
    new_ids: &ArrayRef,
) -> Result<(Vec<Option<usize>>, ItemsCarried)> {
    if old_ids.data_type() != new_ids.data_type() {
        return Err(Error::config(format!(
            "item_id was {} in the earlier run and is {} now",
            old_ids.data_type(),
            new_ids.data_type()
        )));
    }
    let text = |ids: &ArrayRef| {
        cast(ids, &DataType::Utf8).map_err(|e| Error::internal(format!("item ids as text: {e}")))
    };
    let (old, new) = (text(old_ids)?, text(new_ids)?);
    let (old, new) = (old.as_string::<i32>(), new.as_string::<i32>());
    let index: HashMap<&str, usize> = old
        .iter()
        .enumerate()
        .filter_map(|(i, id)| id.map(|id| (id, i)))
        .collect();
    let rows: Vec<Option<usize>> = new
        .iter()
        .map(|id| id.and_then(|id| index.get(id).copied()))
        .collect();
    let kept = rows.iter().flatten().count();
    let carried = ItemsCarried {
        kept,
        added: rows.len() - kept,
        dropped: old.len() - kept,
    };
    Ok((rows, carried))
}

/// Copies item rows of `width` values: row `i` of `new` takes row
/// `rows[i]` of `old` where there is one and keeps its own otherwise.
pub fn copy_rows(new: &mut [f32], old: &[f32], width: usize, rows: &[Option<usize>]) {
    for (i, row) in rows.iter().enumerate() {
        if let Some(j) = row {
            new[i * width..(i + 1) * width].copy_from_slice(&old[j * width..(j + 1) * width]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};

    use super::*;

    #[test]
    fn items_are_matched_by_id_not_by_index() {
        // Yesterday: 10, 20, 30. Today 20 and 30 remain (at other indices),
        // 40 and 5 are new, 10 left.
        let old: ArrayRef = Arc::new(Int64Array::from(vec![10, 20, 30]));
        let new: ArrayRef = Arc::new(Int64Array::from(vec![5, 20, 30, 40]));
        let (rows, carried) = carry_items(&old, &new).unwrap();
        assert_eq!(rows, vec![None, Some(1), Some(2), None]);
        assert_eq!(
            carried,
            ItemsCarried {
                kept: 2,
                added: 2,
                dropped: 1
            }
        );
        let old_table = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5];
        let mut new_table = vec![0.0; 8];
        copy_rows(&mut new_table, &old_table, 2, &rows);
        assert_eq!(new_table, vec![0.0, 0.0, 2.0, 2.5, 3.0, 3.5, 0.0, 0.0]);

        let old: ArrayRef = Arc::new(StringArray::from(vec!["b", "a"]));
        let new: ArrayRef = Arc::new(StringArray::from(vec!["a", "b", "c"]));
        let (rows, _) = carry_items(&old, &new).unwrap();
        assert_eq!(rows, vec![Some(1), Some(0), None]);

        // Integer ids yesterday, string ids today: not the same items.
        let ints: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
        let err = carry_items(&ints, &new).unwrap_err();
        assert!(err.to_string().contains("item_id was Int64"), "{err}");
    }
}
