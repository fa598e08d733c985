//! The stored matrices in a safetensors file: each matrix as tensors under
//! a name prefix (values, scales, offsets, indices, factors) described by
//! its [`Layout`], and rebuilt from them with every size, dtype, index and
//! value checked.

use std::collections::HashMap;

use half::f16;
use safetensors::Dtype;

use super::{Encoded, Layout, Matrix, Panels, PqHead, SparseValues, clamp_i8, pq};

impl Matrix {
    /// Writes the matrix as tensors named `prefix`, `prefix.q`, ….
    pub fn encode(&self, prefix: &str) -> Vec<Encoded> {
        let name = |suffix: &str| format!("{prefix}{suffix}");
        match self {
            Matrix::F32 { rows, cols, data } => {
                vec![(name(""), Dtype::F32, vec![*rows, *cols], f32_bytes(data))]
            }
            Matrix::Int8 {
                rows,
                cols,
                q,
                scale,
                ..
            } => vec![
                (
                    name(".q"),
                    Dtype::I8,
                    vec![*rows, *cols],
                    q.iter().map(|&v| v as u8).collect(),
                ),
                (name(".scale"), Dtype::F16, vec![*rows], f16_bytes(scale)),
            ],
            Matrix::Int4 {
                rows,
                cols,
                group,
                packed,
                scale,
                ..
            } => vec![
                (
                    name(".q4"),
                    Dtype::U8,
                    vec![*rows, cols.div_ceil(2)],
                    packed.clone(),
                ),
                (
                    name(".scale"),
                    Dtype::F16,
                    vec![*rows, cols.div_ceil(*group)],
                    f16_bytes(scale),
                ),
            ],
            Matrix::Sparse {
                rows,
                indptr,
                indices,
                values,
                ..
            } => {
                let mut out = vec![
                    (
                        name(".indptr"),
                        Dtype::U32,
                        vec![rows + 1],
                        indptr.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ),
                    (
                        name(".indices"),
                        Dtype::U16,
                        vec![indices.len()],
                        indices.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ),
                ];
                match values {
                    SparseValues::F32(v) => {
                        out.push((name(".values"), Dtype::F32, vec![v.len()], f32_bytes(v)))
                    }
                    SparseValues::Int8 { q, scale } => {
                        out.push((
                            name(".values.q"),
                            Dtype::I8,
                            vec![q.len()],
                            q.iter().map(|&v| v as u8).collect(),
                        ));
                        out.push((name(".scale"), Dtype::F16, vec![*rows], f16_bytes(scale)));
                    }
                }
                out
            }
            Matrix::Pq {
                rows,
                cols,
                subspaces,
                codes,
                codebook,
                head,
            } => {
                let mut out = vec![
                    (
                        name(".codes"),
                        Dtype::U8,
                        vec![*rows, *subspaces],
                        codes.clone(),
                    ),
                    (
                        name(".codebook"),
                        Dtype::F32,
                        vec![*subspaces, pq::CENTROIDS, cols / subspaces],
                        f32_bytes(codebook),
                    ),
                ];
                if let Some(head) = head {
                    out.push((
                        name(".head_rows"),
                        Dtype::U32,
                        vec![head.rows().len()],
                        head.rows().iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ));
                    out.extend(head.values().encode(&name(".head")));
                }
                out
            }
            Matrix::LowRank { u, v } => {
                let mut out = u.encode(&name(".u"));
                out.extend(v.encode(&name(".v")));
                out
            }
        }
    }

    /// Rebuilds a matrix stored under `prefix` with `layout` from `tensors`,
    /// removing the tensors it uses. Every size, dtype, index and value is
    /// checked; the error says which tensor and what is wrong.
    pub fn decode(
        prefix: &str,
        layout: &Layout,
        tensors: &mut HashMap<String, (Dtype, Vec<usize>, &[u8])>,
    ) -> std::result::Result<Matrix, String> {
        let (rows, cols) = layout.shape();
        let elements = rows
            .checked_mul(cols)
            .filter(|&e| e <= 1 << 34)
            .ok_or_else(|| format!("{prefix}: {rows} × {cols} is too large"))?;
        if rows == 0 || cols == 0 {
            return Err(format!("{prefix}: empty matrix {rows} × {cols}"));
        }
        let mut take = |suffix: &str, dtype: Dtype, shape: Vec<usize>| {
            let name = format!("{prefix}{suffix}");
            let (d, s, bytes) = tensors
                .remove(&name)
                .ok_or_else(|| format!("missing tensor {name}"))?;
            if d != dtype || s != shape {
                return Err(format!(
                    "tensor {name} is {d:?} {s:?}, its layout needs {dtype:?} {shape:?}"
                ));
            }
            Ok(bytes)
        };
        let scales = |bytes: &[u8], name: &str| -> std::result::Result<Vec<f32>, String> {
            let v = read_f16(bytes);
            if v.iter().any(|s| !s.is_finite() || *s < 0.0) {
                return Err(format!("{prefix}{name}: scales must be finite and ≥ 0"));
            }
            Ok(v)
        };
        Ok(match layout {
            Layout::F32 { .. } => {
                let data = read_f32(take("", Dtype::F32, vec![rows, cols])?);
                if data.iter().any(|v| !v.is_finite()) {
                    return Err(format!("{prefix}: non-finite weight"));
                }
                Matrix::F32 { rows, cols, data }
            }
            Layout::Int8 { .. } => {
                let q = take(".q", Dtype::I8, vec![rows, cols])?
                    .iter()
                    .map(|&b| b as i8)
                    .collect();
                let scale = scales(take(".scale", Dtype::F16, vec![rows])?, ".scale")?;
                Matrix::Int8 {
                    rows,
                    cols,
                    q: clamp_i8(q),
                    scale,
                    panels: Panels::default(),
                }
            }
            Layout::Int4 { group, .. } => {
                if *group == 0 || *group > cols {
                    return Err(format!(
                        "{prefix}: group {group} must be in 1..={cols} (the row width)"
                    ));
                }
                let groups = cols.div_ceil(*group);
                let packed = take(".q4", Dtype::U8, vec![rows, cols.div_ceil(2)])?.to_vec();
                let scale = scales(take(".scale", Dtype::F16, vec![rows, groups])?, ".scale")?;
                Matrix::Int4 {
                    rows,
                    cols,
                    group: *group,
                    packed,
                    scale,
                    panels: Panels::default(),
                }
            }
            Layout::Sparse { nnz, int8, .. } => {
                if !Matrix::sparse_fits(cols) {
                    return Err(format!("{prefix}: {cols} columns exceed 16-bit indices"));
                }
                if *nnz > elements {
                    return Err(format!(
                        "{prefix}: {nnz} values in a {rows} × {cols} matrix"
                    ));
                }
                let indptr: Vec<u32> = take(".indptr", Dtype::U32, vec![rows + 1])?
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                let indices: Vec<u16> = take(".indices", Dtype::U16, vec![*nnz])?
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect();
                if indptr[0] != 0 || indptr[rows] as usize != *nnz {
                    return Err(format!(
                        "{prefix}.indptr must run from 0 to the {nnz} values"
                    ));
                }
                for j in 0..rows {
                    let (a, b) = (indptr[j] as usize, indptr[j + 1] as usize);
                    if a > b || b > *nnz {
                        return Err(format!(
                            "{prefix}.indptr decreases or passes the {nnz} values at row {j}"
                        ));
                    }
                    let row = &indices[a..b];
                    if row.iter().any(|&c| c as usize >= cols)
                        || row.windows(2).any(|w| w[0] >= w[1])
                    {
                        return Err(format!(
                            "{prefix}.indices of row {j} are not increasing columns below {cols}"
                        ));
                    }
                }
                let values = if *int8 {
                    let q = take(".values.q", Dtype::I8, vec![*nnz])?
                        .iter()
                        .map(|&b| b as i8)
                        .collect();
                    let scale = scales(take(".scale", Dtype::F16, vec![rows])?, ".scale")?;
                    SparseValues::Int8 {
                        q: clamp_i8(q),
                        scale,
                    }
                } else {
                    let v = read_f32(take(".values", Dtype::F32, vec![*nnz])?);
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(format!("{prefix}.values: non-finite weight"));
                    }
                    SparseValues::F32(v)
                };
                Matrix::Sparse {
                    rows,
                    cols,
                    indptr,
                    indices,
                    values,
                }
            }
            Layout::Pq {
                subspaces, head, ..
            } => {
                if *subspaces == 0 || !cols.is_multiple_of(*subspaces) {
                    return Err(format!(
                        "{prefix}: {subspaces} subspaces do not divide its {cols} columns"
                    ));
                }
                let codes = take(".codes", Dtype::U8, vec![rows, *subspaces])?.to_vec();
                let codebook = read_f32(take(
                    ".codebook",
                    Dtype::F32,
                    vec![*subspaces, pq::CENTROIDS, cols / subspaces],
                )?);
                if codebook.iter().any(|v| !v.is_finite()) {
                    return Err(format!("{prefix}.codebook: non-finite centroid"));
                }
                let head = match head {
                    None => None,
                    Some(layout) => {
                        if !matches!(
                            **layout,
                            Layout::F32 { .. } | Layout::Int8 { .. } | Layout::Int4 { .. }
                        ) {
                            return Err(format!(
                                "{prefix}.head: rows stored whole must be dense or quantized"
                            ));
                        }
                        let (h, head_cols) = layout.shape();
                        if head_cols != cols || h == 0 || h > rows {
                            return Err(format!(
                                "{prefix}.head: {h} × {head_cols} rows kept whole in a {rows} × {cols} matrix"
                            ));
                        }
                        let head_rows: Vec<u32> = take(".head_rows", Dtype::U32, vec![h])?
                            .chunks_exact(4)
                            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                            .collect();
                        let values = Matrix::decode(&format!("{prefix}.head"), layout, tensors)?;
                        Some(
                            PqHead::new(head_rows, values, rows)
                                .map_err(|e| format!("{prefix}.head_rows: {e}"))?,
                        )
                    }
                };
                Matrix::Pq {
                    rows,
                    cols,
                    subspaces: *subspaces,
                    codes,
                    codebook,
                    head,
                }
            }
            Layout::LowRank { rank, u, v, .. } => {
                if matches!(
                    **u,
                    Layout::LowRank { .. } | Layout::Sparse { .. } | Layout::Pq { .. }
                ) || matches!(
                    **v,
                    Layout::LowRank { .. } | Layout::Sparse { .. } | Layout::Pq { .. }
                ) {
                    return Err(format!(
                        "{prefix}: low-rank factors must be dense or quantized"
                    ));
                }
                if u.shape() != (rows, *rank) || v.shape() != (*rank, cols) {
                    return Err(format!(
                        "{prefix}: factors {:?} · {:?} do not make {rows} × {cols} at rank {rank}",
                        u.shape(),
                        v.shape()
                    ));
                }
                let u = Matrix::decode(&format!("{prefix}.u"), u, tensors)?;
                let v = Matrix::decode(&format!("{prefix}.v"), v, tensors)?;
                Matrix::LowRank {
                    u: Box::new(u),
                    v: Box::new(v),
                }
            }
        })
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| f16::from_f32(*x).to_le_bytes())
        .collect()
}

/// Little-endian `f32` values.
pub fn read_f32(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn read_f16(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}
