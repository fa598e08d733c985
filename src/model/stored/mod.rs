//! Weight matrices as stored and scored: dense `f32`, `int8` with one scale
//! per output row, `int4` packed two per byte with one scale per group of a
//! row, sparse rows (CSR with 16-bit column indices, `f32` or `int8`
//! values), and low-rank factor pairs — each scheme composable with the
//! others where it makes sense (`lowrank` factors may be quantized, sparse
//! values may be `int8`), and product-quantized rows (one byte per
//! sub-vector, a code into its subspace's 256 centroids).
//!
//! Every matrix is output-major, as `torch.nn.Linear` stores it: row `j`
//! holds the weights of output `j`, so the product is always
//! `out[i, j] = Σ_k x[i, k] · M[j, k]` — a user's hidden state against the
//! item table, or a layer's input against its weights. The integer schemes
//! compute it on the stored integers (the input row is quantized to `int8`
//! on the fly and integer dot products accumulate in `i32`); nothing is
//! expanded to `f32` at load time.
//!
//! [`Matrix::encode`] writes a matrix as safetensors tensors under a name
//! prefix and describes it by a [`Layout`] (kept in the file's metadata);
//! [`Matrix::decode`] rebuilds it from a layout and the file's tensors,
//! refusing anything inconsistent: wrong dtypes or shapes, sizes that do
//! not multiply out, unsorted or out-of-range sparse indices, non-finite
//! values, negative scales.

use std::ops::Range;

use half::f16;
use rayon::prelude::*;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

pub mod codec;
pub mod pq;
pub mod simd;

pub use codec::read_f32;

use super::kernels::{View, matmul};
use simd::{Int8Kernel, dots_into, int8_panel_product, int8_product, quantize_activations};

/// Largest int8 magnitude used (±127: −128 is never produced, so the
/// `maddubs` kernel cannot saturate).
const I8_MAX: f32 = 127.0;
/// Largest int4 magnitude used (±7).
const I4_MAX: f32 = 7.0;
/// Adding and subtracting 1.5 · 2²³ rounds an `f32` below 2²² to the nearest integer.
const ROUNDER: f32 = 12_582_912.0;
/// Rows of an `int4` matrix widened to `int8` at a time (8 KiB at 32 columns).
const INT4_TILE_ROWS: usize = 256;
/// Products below this many multiply–adds run on the calling thread.
const PARALLEL_WORK: usize = 1 << 17;
/// Rows of a product-quantized matrix decoded to `f32` at a time for the
/// product (512 KiB at 64 columns).
const PQ_TILE_ROWS: usize = 2048;
/// Rows of a tile one thread decodes at a time.
const PQ_DECODE_ROWS: usize = 256;

/// How a matrix is stored: the scheme and its sizes, recursively for
/// low-rank factors. Kept in the artifact's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Layout {
    /// Dense `f32`.
    F32 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
    },
    /// `int8` values, one `f16` scale per row.
    Int8 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
    },
    /// `int4` values packed two per byte, one `f16` scale per `group` values of a row.
    Int4 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Values sharing a scale.
        group: usize,
    },
    /// Compressed sparse rows: the kept values of each row and their columns.
    Sparse {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Values kept.
        nnz: usize,
        /// `f32` values, or `int8` with one scale per row.
        int8: bool,
    },
    /// Product-quantized rows: each row's `subspaces` sub-vectors stored
    /// as a byte each, a code into that subspace's 256 `f32` centroids.
    Pq {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Sub-vectors per row (a divisor of `cols`).
        subspaces: usize,
        /// The rows stored whole (`.head_rows`, then the matrix `.head` of
        /// these rows in this layout: dense or quantized); none without.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        head: Option<Box<Layout>>,
    },
    /// `M ≈ U · V` with `U` rows × rank and `V` rank × cols.
    LowRank {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Inner dimension.
        rank: usize,
        /// The left factor's layout.
        u: Box<Layout>,
        /// The right factor's layout.
        v: Box<Layout>,
    },
}

impl Layout {
    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        match *self {
            Layout::F32 { rows, cols }
            | Layout::Int8 { rows, cols }
            | Layout::Int4 { rows, cols, .. }
            | Layout::Sparse { rows, cols, .. }
            | Layout::Pq { rows, cols, .. }
            | Layout::LowRank { rows, cols, .. } => (rows, cols),
        }
    }

    /// The scheme's name as `inspect` prints it (`lowrank(int8·int8)`).
    pub fn scheme(&self) -> String {
        match self {
            Layout::F32 { .. } => "f32".into(),
            Layout::Int8 { .. } => "int8-row".into(),
            Layout::Int4 { group, .. } => format!("int4-g{group}"),
            Layout::Sparse { int8: false, .. } => "sparse-f32".into(),
            Layout::Sparse { int8: true, .. } => "sparse-int8".into(),
            Layout::Pq {
                subspaces,
                head: None,
                ..
            } => format!("pq-{subspaces}x256"),
            Layout::Pq {
                subspaces,
                head: Some(head),
                ..
            } => format!(
                "pq-{subspaces}x256+head-{}({})",
                head.shape().0,
                head.scheme()
            ),
            Layout::LowRank { rank, u, v, .. } => {
                format!("lowrank-r{rank}({}·{})", u.scheme(), v.scheme())
            }
        }
    }
}

/// The values of a sparse matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum SparseValues {
    /// As trained.
    F32(Vec<f32>),
    /// `int8`, one scale per row.
    Int8 {
        /// Quantized values, in the order of the column indices.
        q: Vec<i8>,
        /// Per row.
        scale: Vec<f32>,
    },
}

/// The rows of a product-quantized matrix stored whole: which rows, their
/// values (dense or quantized), and each row's place among them.
#[derive(Debug, Clone, PartialEq)]
pub struct PqHead {
    rows: Vec<u32>,
    values: Box<Matrix>,
    /// Per row of the whole matrix: its row in `values`, or `u32::MAX`.
    slot: Vec<u32>,
}

impl PqHead {
    /// `rows` (strictly increasing, below `of_rows`) stored as `values`
    /// (`rows.len() × cols`, dense or quantized). The error says what is
    /// wrong.
    pub fn new(
        rows: Vec<u32>,
        values: Matrix,
        of_rows: usize,
    ) -> std::result::Result<PqHead, String> {
        if rows.is_empty() || rows.len() != values.rows() {
            return Err(format!(
                "{} head rows for {} stored rows",
                rows.len(),
                values.rows()
            ));
        }
        if !matches!(
            values,
            Matrix::F32 { .. } | Matrix::Int8 { .. } | Matrix::Int4 { .. }
        ) {
            return Err("head rows must be stored dense or quantized".into());
        }
        if rows.windows(2).any(|w| w[0] >= w[1])
            || rows.last().is_some_and(|&r| r as usize >= of_rows)
        {
            return Err(format!("head rows must be increasing and below {of_rows}"));
        }
        let mut slot = vec![u32::MAX; of_rows];
        for (k, &r) in rows.iter().enumerate() {
            slot[r as usize] = k as u32;
        }
        Ok(PqHead {
            rows,
            values: Box::new(values),
            slot,
        })
    }

    /// The rows stored whole, increasing.
    pub fn rows(&self) -> &[u32] {
        &self.rows
    }

    /// Their values.
    pub fn values(&self) -> &Matrix {
        &self.values
    }
}

/// An output-major weight matrix in one of the stored schemes.
#[derive(Debug, Clone, PartialEq)]
pub enum Matrix {
    /// Dense `rows × cols`.
    F32 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Row-major values.
        data: Vec<f32>,
    },
    /// `int8` with a scale per row: `M[j, k] = scale[j] · q[j, k]`.
    Int8 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Row-major quantized values.
        q: Vec<i8>,
        /// Per row.
        scale: Vec<f32>,
        /// `q` laid out for this process's panel kernel, made at first use.
        panels: Panels,
    },
    /// `int4` in `[-8, 7]`, stored as `q + 8`, low nibble first; each row
    /// padded to whole bytes; a scale per group of `group` values.
    Int4 {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Values per scale.
        group: usize,
        /// `rows × ⌈cols / 2⌉` bytes.
        packed: Vec<u8>,
        /// `rows × ⌈cols / group⌉` scales.
        scale: Vec<f32>,
        /// With one scale per row, the values widened to `int8` and laid
        /// out for this process's panel kernel, made at first use.
        panels: Panels,
    },
    /// Compressed sparse rows.
    Sparse {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// `rows + 1` offsets into `indices` and the values.
        indptr: Vec<u32>,
        /// Column of each kept value, increasing within a row.
        indices: Vec<u16>,
        /// The kept values.
        values: SparseValues,
    },
    /// Product-quantized rows: row `j`'s sub-vector `s` is centroid
    /// `codes[j · subspaces + s]` of subspace `s`.
    Pq {
        /// Outputs.
        rows: usize,
        /// Inputs.
        cols: usize,
        /// Sub-vectors per row (a divisor of `cols`).
        subspaces: usize,
        /// `rows × subspaces` codes.
        codes: Vec<u8>,
        /// `subspaces × 256 × cols / subspaces` centroid values.
        codebook: Vec<f32>,
        /// Rows stored whole instead of by their codes.
        head: Option<PqHead>,
    },
    /// `U · V`.
    LowRank {
        /// `rows × rank`.
        u: Box<Matrix>,
        /// `rank × cols`.
        v: Box<Matrix>,
    },
}

/// A quantized matrix's values as `int8` (an `int4` matrix's widened) laid
/// out in panels for this process's integer kernel ([`simd::PanelSet`]),
/// made the first time the matrix is applied with a panel kernel: derived
/// from the stored values, never written, and left out of comparisons.
/// Every constructor starts it empty; a matrix's values are replaced whole,
/// never edited in place, so the panels never go stale.
#[derive(Debug, Clone, Default)]
pub struct Panels(std::sync::OnceLock<simd::PanelSet>);

impl PartialEq for Panels {
    fn eq(&self, _: &Panels) -> bool {
        true
    }
}

impl Panels {
    /// The panels of the `rows × cols` row-major `int8` values `values()`
    /// gives, laid out for `kernel` (a panel kernel; one per process), made
    /// on the first call.
    fn get<V: AsRef<[i8]>>(
        &self,
        kernel: simd::Int8Kernel,
        rows: usize,
        cols: usize,
        values: impl FnOnce() -> V,
    ) -> &simd::PanelSet {
        let set = self
            .0
            .get_or_init(|| simd::PanelSet::pack(kernel, values().as_ref(), rows, cols));
        assert_eq!(set.kernel(), kernel, "one integer kernel per process");
        set
    }
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
pub type Encoded = (String, Dtype, Vec<usize>, Vec<u8>);

/// Rounds a positive scale up to the next `f16` (so `|x| / scale` never
/// exceeds the integer range once the scale is stored as `f16`).
fn f16_scale(max_abs: f32, levels: f32) -> f32 {
    if max_abs <= 0.0 || !max_abs.is_finite() {
        return 0.0;
    }
    let s = max_abs / levels;
    let mut h = f16::from_f32(s);
    if h.to_f32() < s {
        h = f16::from_bits(h.to_bits() + 1);
    }
    h.to_f32()
}

/// Quantizes `values` symmetrically to `±levels` into `out` with one scale
/// (max |v| / levels, rounded up to `f16`), which it returns.
fn quantize_span(values: &[f32], levels: f32, out: &mut [i8]) -> f32 {
    let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = f16_scale(max, levels);
    for (o, &v) in out.iter_mut().zip(values) {
        *o = if scale == 0.0 {
            0
        } else {
            (v / scale).round().clamp(-levels, levels) as i8
        };
    }
    scale
}

impl Matrix {
    /// A dense matrix from row-major values.
    pub fn dense(rows: usize, cols: usize, data: Vec<f32>) -> Matrix {
        assert_eq!(data.len(), rows * cols, "dense matrix size");
        Matrix::F32 { rows, cols, data }
    }

    /// The transpose of a row-major `rows × cols` matrix, as a dense
    /// output-major matrix (`cols` outputs): how an input-major `x · W`
    /// weight becomes stored.
    pub fn from_input_major(rows: usize, cols: usize, w: &[f32]) -> Matrix {
        let mut data = vec![0.0; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                data[c * rows + r] = w[r * cols + c];
            }
        }
        Matrix::dense(cols, rows, data)
    }

    /// `int8` with a scale per row (symmetric, round to nearest): every
    /// value is within half a scale step of the original.
    pub fn quantize_int8(rows: usize, cols: usize, data: &[f32]) -> Matrix {
        let (q, scale) = quantize_rows_int8(data, cols);
        debug_assert_eq!(scale.len(), rows);
        Matrix::Int8 {
            rows,
            cols,
            q,
            scale,
            panels: Panels::default(),
        }
    }

    /// `int4` with a scale per `group` values of a row (symmetric, ±7).
    pub fn quantize_int4(rows: usize, cols: usize, group: usize, data: &[f32]) -> Matrix {
        // A group never spans more than a row.
        let group = group.clamp(1, cols.max(1));
        let groups = cols.div_ceil(group);
        let width = cols.div_ceil(2);
        let mut packed = vec![0u8; rows * width];
        let mut scale = vec![0.0f32; rows * groups];
        let mut values = vec![0i8; group];
        for r in 0..rows {
            let row = &data[r * cols..(r + 1) * cols];
            let bytes = &mut packed[r * width..(r + 1) * width];
            for g in 0..groups {
                let span = g * group..((g + 1) * group).min(cols);
                let q = &mut values[..span.len()];
                scale[r * groups + g] = quantize_span(&row[span.clone()], I4_MAX, q);
                for (c, &v) in span.zip(q.iter()) {
                    let nibble = (v + 8) as u8;
                    bytes[c / 2] |= if c.is_multiple_of(2) {
                        nibble
                    } else {
                        nibble << 4
                    };
                }
            }
            if cols % 2 == 1 {
                // The padding nibble decodes to 0.
                bytes[width - 1] |= 8 << 4;
            }
        }
        Matrix::Int4 {
            rows,
            cols,
            group,
            packed,
            scale,
            panels: Panels::default(),
        }
    }

    /// Keeps the non-zero values of a dense row-major matrix as sparse rows,
    /// `int8`-quantized per row when asked. Panics beyond 65,536 columns
    /// (callers check [`Matrix::sparse_fits`]).
    pub fn sparsify(rows: usize, cols: usize, data: &[f32], int8: bool) -> Matrix {
        assert!(
            Matrix::sparse_fits(cols),
            "too many columns for u16 indices"
        );
        let mut indptr = Vec::with_capacity(rows + 1);
        let mut indices = Vec::new();
        let mut values = Vec::new();
        indptr.push(0u32);
        for r in 0..rows {
            for (c, &v) in data[r * cols..(r + 1) * cols].iter().enumerate() {
                if v != 0.0 {
                    indices.push(c as u16);
                    values.push(v);
                }
            }
            indptr.push(indices.len() as u32);
        }
        let values = if int8 {
            let mut q = vec![0i8; values.len()];
            let scale = (0..rows)
                .map(|r| {
                    let span = indptr[r] as usize..indptr[r + 1] as usize;
                    quantize_span(&values[span.clone()], I8_MAX, &mut q[span])
                })
                .collect();
            SparseValues::Int8 { q, scale }
        } else {
            SparseValues::F32(values)
        };
        Matrix::Sparse {
            rows,
            cols,
            indptr,
            indices,
            values,
        }
    }

    /// Product quantization of a dense row-major table with `subspaces`
    /// sub-vectors per row (a divisor of `cols`), the codebooks fitted by
    /// k-means from `seed` ([`pq::fit`]).
    pub fn quantize_pq(
        rows: usize,
        cols: usize,
        subspaces: usize,
        data: &[f32],
        seed: u64,
    ) -> Matrix {
        let (codes, codebook) = pq::fit(data, rows, cols, subspaces, None, seed);
        Matrix::Pq {
            rows,
            cols,
            subspaces,
            codes,
            codebook,
            head: None,
        }
    }

    /// Whether a matrix with `cols` columns can be stored sparsely.
    pub fn sparse_fits(cols: usize) -> bool {
        cols <= u16::MAX as usize + 1
    }

    /// Outputs.
    pub fn rows(&self) -> usize {
        match self {
            Matrix::F32 { rows, .. }
            | Matrix::Int8 { rows, .. }
            | Matrix::Int4 { rows, .. }
            | Matrix::Pq { rows, .. }
            | Matrix::Sparse { rows, .. } => *rows,
            Matrix::LowRank { u, .. } => u.rows(),
        }
    }

    /// Inputs.
    pub fn cols(&self) -> usize {
        match self {
            Matrix::F32 { cols, .. }
            | Matrix::Int8 { cols, .. }
            | Matrix::Int4 { cols, .. }
            | Matrix::Pq { cols, .. }
            | Matrix::Sparse { cols, .. } => *cols,
            Matrix::LowRank { v, .. } => v.cols(),
        }
    }

    /// Weights stored (kept values; scales and indices not counted).
    pub fn params(&self) -> u64 {
        match self {
            Matrix::F32 { data, .. } => data.len() as u64,
            Matrix::Int8 { q, .. } => q.len() as u64,
            Matrix::Int4 { rows, cols, .. } => (rows * cols) as u64,
            Matrix::Sparse { indices, .. } => indices.len() as u64,
            Matrix::Pq {
                codes,
                codebook,
                head,
                ..
            } => {
                (codes.len() + codebook.len()) as u64
                    + head.as_ref().map_or(0, |h| h.values.params())
            }
            Matrix::LowRank { u, v } => u.params() + v.params(),
        }
    }

    /// Bytes of the stored tensors (values, scales, indices).
    pub fn stored_bytes(&self) -> u64 {
        self.encode("m").iter().map(|t| t.3.len() as u64).sum()
    }

    /// The layout describing how it is stored.
    pub fn layout(&self) -> Layout {
        match self {
            Matrix::F32 { rows, cols, .. } => Layout::F32 {
                rows: *rows,
                cols: *cols,
            },
            Matrix::Int8 { rows, cols, .. } => Layout::Int8 {
                rows: *rows,
                cols: *cols,
            },
            Matrix::Int4 {
                rows, cols, group, ..
            } => Layout::Int4 {
                rows: *rows,
                cols: *cols,
                group: *group,
            },
            Matrix::Sparse {
                rows,
                cols,
                indices,
                values,
                ..
            } => Layout::Sparse {
                rows: *rows,
                cols: *cols,
                nnz: indices.len(),
                int8: matches!(values, SparseValues::Int8 { .. }),
            },
            Matrix::Pq {
                rows,
                cols,
                subspaces,
                head,
                ..
            } => Layout::Pq {
                rows: *rows,
                cols: *cols,
                subspaces: *subspaces,
                head: head.as_ref().map(|h| Box::new(h.values.layout())),
            },
            Matrix::LowRank { u, v } => {
                let (rows, rank) = u.layout().shape();
                Layout::LowRank {
                    rows,
                    cols: v.layout().shape().1,
                    rank,
                    u: Box::new(u.layout()),
                    v: Box::new(v.layout()),
                }
            }
        }
    }

    /// Every value as `f32` (tests, SVD of a stored factor, inspection).
    pub fn to_dense(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        let mut out = vec![0.0; rows * cols];
        for (j, row) in out.chunks_mut(cols.max(1)).enumerate().take(rows) {
            self.row_into(j, row);
        }
        out
    }

    /// Writes row `j` (an item's embedding, say) as `f32` into `out` (`cols` values).
    pub fn row_into(&self, j: usize, out: &mut [f32]) {
        match self {
            Matrix::F32 { cols, data, .. } => out.copy_from_slice(&data[j * cols..(j + 1) * cols]),
            Matrix::Int8 { cols, q, scale, .. } => {
                let s = scale[j];
                for (o, &v) in out.iter_mut().zip(&q[j * cols..(j + 1) * cols]) {
                    *o = s * f32::from(v);
                }
            }
            Matrix::Int4 {
                cols,
                group,
                packed,
                scale,
                ..
            } => {
                // A group (one scale) at a time, the nibbles read in order.
                let (width, groups) = (cols.div_ceil(2), cols.div_ceil(*group));
                let bytes = &packed[j * width..(j + 1) * width];
                for (g, span) in out[..*cols].chunks_mut(*group).enumerate() {
                    let s = scale[j * groups + g];
                    for (k, o) in span.iter_mut().enumerate() {
                        *o = s * f32::from(nibble(bytes, g * group + k));
                    }
                }
            }
            Matrix::Sparse {
                indptr,
                indices,
                values,
                ..
            } => {
                out.fill(0.0);
                let span = indptr[j] as usize..indptr[j + 1] as usize;
                match values {
                    SparseValues::F32(v) => {
                        for p in span {
                            out[indices[p] as usize] = v[p];
                        }
                    }
                    SparseValues::Int8 { q, scale } => {
                        for p in span {
                            out[indices[p] as usize] = scale[j] * f32::from(q[p]);
                        }
                    }
                }
            }
            Matrix::Pq {
                cols,
                subspaces,
                codes,
                codebook,
                head,
                ..
            } => match head {
                Some(h) if h.slot[j] != u32::MAX => {
                    h.values.row_into(h.slot[j] as usize, &mut out[..*cols])
                }
                _ => pq::row_into(codes, codebook, *subspaces, j, &mut out[..*cols]),
            },
            Matrix::LowRank { u, v } => {
                // Row j of U·V = Σ_t U[j, t] · V[t, :], without allocating.
                out.fill(0.0);
                for t in 0..u.cols() {
                    let c = u.get(j, t);
                    if c != 0.0 {
                        v.add_row_scaled(t, c, out);
                    }
                }
            }
        }
    }

    /// The value at `(j, k)` (dense and quantized schemes; 0 for others).
    fn get(&self, j: usize, k: usize) -> f32 {
        match self {
            Matrix::F32 { cols, data, .. } => data[j * cols + k],
            Matrix::Int8 { cols, q, scale, .. } => scale[j] * f32::from(q[j * cols + k]),
            Matrix::Int4 {
                cols,
                group,
                packed,
                scale,
                ..
            } => int4_at(*cols, *group, packed, scale, j, k),
            Matrix::Sparse { .. } | Matrix::Pq { .. } | Matrix::LowRank { .. } => {
                let mut row = vec![0.0; self.cols()];
                self.row_into(j, &mut row);
                row[k]
            }
        }
    }

    /// `out += c · row j`.
    fn add_row_scaled(&self, j: usize, c: f32, out: &mut [f32]) {
        match self {
            Matrix::F32 { cols, data, .. } => {
                for (o, v) in out.iter_mut().zip(&data[j * cols..(j + 1) * cols]) {
                    *o += c * v;
                }
            }
            Matrix::Int8 { cols, q, scale, .. } => {
                let s = c * scale[j];
                for (o, &v) in out.iter_mut().zip(&q[j * cols..(j + 1) * cols]) {
                    *o += s * f32::from(v);
                }
            }
            _ => {
                let mut row = vec![0.0; self.cols()];
                self.row_into(j, &mut row);
                for (o, v) in out.iter_mut().zip(&row) {
                    *o += c * v;
                }
            }
        }
    }

    /// Does [`Matrix::apply`] read the stored values as they are, with no
    /// per-call packing of the whole matrix (the integer kernels)?
    pub fn streams_as_stored(&self) -> bool {
        matches!(
            self,
            Matrix::Int8 { .. } | Matrix::Int4 { .. } | Matrix::Pq { .. }
        )
    }

    /// Can the product be computed a range of stored rows at a time
    /// ([`Matrix::row_blocks`]): `int8`, and `int4` with one scale per row?
    pub fn streams_in_blocks(&self) -> bool {
        match self {
            Matrix::Int8 { .. } => true,
            Matrix::Int4 { cols, group, .. } => group >= cols,
            _ => false,
        }
    }

    /// The product of the `n` rows of `x` with this matrix, ready to be
    /// computed a range of stored rows at a time: the input rows quantized
    /// once, the stored values read as they are (in this process's panels
    /// where its integer kernel uses them; an `int4` matrix's panels hold its
    /// values widened to `int8`, `rows × cols` bytes beside the packed
    /// ones). `None` unless [`Matrix::streams_in_blocks`].
    pub fn row_blocks(&self, x: &[f32], n: usize) -> Option<RowBlocks<'_>> {
        if !self.streams_in_blocks() {
            return None;
        }
        let (rows, cols) = (self.rows(), self.cols());
        assert!(x.len() >= n * cols, "input smaller than n × cols");
        let (xq, xs) = quantize_activations(&x[..n * cols], cols);
        let kernel = simd::int8_kernel();
        let (values, scale) = match self {
            Matrix::Int8 {
                q, scale, panels, ..
            } => match kernel {
                Int8Kernel::Portable => (RowValues::Int8(q), scale),
                _ => (
                    RowValues::Panels(panels.get(kernel, rows, cols, || q)),
                    scale,
                ),
            },
            Matrix::Int4 {
                packed,
                scale,
                panels,
                ..
            } => match kernel {
                Int8Kernel::Portable => (RowValues::Int4(packed), scale),
                _ => (
                    RowValues::Panels(panels.get(kernel, rows, cols, || {
                        let mut wide = vec![0i8; rows * cols];
                        widen_int4_rows(packed, cols, &mut wide);
                        wide
                    })),
                    scale,
                ),
            },
            _ => return None,
        };
        Some(RowBlocks {
            xq,
            xs,
            cols,
            values,
            scale,
        })
    }

    /// `out[i · ldo + j] = Σ_k x[i · cols + k] · M[j, k]` for the `n` rows
    /// of `x`: overwrites `rows` values of each of `n` output rows.
    pub fn apply(&self, x: &[f32], n: usize, out: &mut [f32], ldo: usize) {
        let (rows, cols) = (self.rows(), self.cols());
        assert!(x.len() >= n * cols, "input smaller than n × cols");
        assert!(
            n == 0 || (n - 1) * ldo + rows <= out.len(),
            "output too small"
        );
        if n == 0 || rows == 0 {
            return;
        }
        let work = n * rows * cols;
        match self {
            Matrix::F32 { data, .. } => {
                let par = if work >= PARALLEL_WORK {
                    super::kernels::par_all()
                } else {
                    gemm::Parallelism::None
                };
                matmul(
                    out,
                    ldo,
                    View::rm(&x[..n * cols], n, cols),
                    View::rm(data, rows, cols).t(),
                    false,
                    1.0,
                    par,
                );
            }
            Matrix::Int4 {
                group,
                packed,
                scale,
                ..
            } if *group < cols => {
                let (xq, xs) = quantize_activations(&x[..n * cols], cols);
                let (width, groups) = (cols.div_ceil(2), cols.div_ceil(*group));
                for_user_blocks(out, ldo, n, work, |first, count, o| {
                    let xq = &xq[first * cols..(first + count) * cols];
                    let mut dots = vec![0i32; count];
                    let mut acc = vec![0f32; count];
                    let mut unpacked = vec![0i8; cols];
                    for j in 0..rows {
                        // Each stored row is unpacked once per block of users.
                        let bytes = &packed[j * width..(j + 1) * width];
                        for (c, u) in unpacked.iter_mut().enumerate() {
                            *u = nibble(bytes, c);
                        }
                        acc.fill(0.0);
                        for g in 0..groups {
                            let span = g * group..((g + 1) * group).min(cols);
                            let s = scale[j * groups + g];
                            dots_into(xq, count, cols, span.start, &unpacked[span], &mut dots);
                            for (a, d) in acc.iter_mut().zip(&dots) {
                                *a += s * *d as f32;
                            }
                        }
                        for (i, a) in acc.iter().enumerate() {
                            o[i * ldo + j] = xs[first + i] * a;
                        }
                    }
                });
            }
            Matrix::Int8 { .. } | Matrix::Int4 { .. } => {
                // One scale per row (the grouped `int4` case is above).
                let blocks = self
                    .row_blocks(&x[..n * cols], n)
                    .expect("a matrix streamed in blocks has row blocks");
                for_user_blocks(out, ldo, n, work, |first, count, o| {
                    blocks.product(first..first + count, 0..rows, o, ldo)
                });
            }
            Matrix::Sparse {
                indptr,
                indices,
                values,
                ..
            } => {
                for_user_blocks(out, ldo, n, work, |first, count, o| {
                    for i in 0..count {
                        let xi = &x[(first + i) * cols..(first + i + 1) * cols];
                        for (j, o) in o[i * ldo..i * ldo + rows].iter_mut().enumerate() {
                            let span = indptr[j] as usize..indptr[j + 1] as usize;
                            let idx = &indices[span.clone()];
                            *o = match values {
                                SparseValues::F32(v) => idx
                                    .iter()
                                    .zip(&v[span])
                                    .map(|(&c, &w)| w * xi[c as usize])
                                    .sum(),
                                SparseValues::Int8 { q, scale } => {
                                    scale[j]
                                        * idx
                                            .iter()
                                            .zip(&q[span])
                                            .map(|(&c, &w)| f32::from(w) * xi[c as usize])
                                            .sum::<f32>()
                                }
                            };
                        }
                    }
                });
            }
            Matrix::Pq { .. } => {
                // A tile of rows decoded to f32 at a time (once for all the
                // users, its rows split between threads), then one dense
                // product of every user with the tile: the table is never
                // expanded whole.
                // One user runs on the calling thread, as in `for_user_blocks`.
                let par = work >= PARALLEL_WORK && n > 1;
                let x = View::rm(&x[..n * cols], n, cols);
                let mut tile = vec![0.0f32; PQ_TILE_ROWS.min(rows) * cols];
                for j0 in (0..rows).step_by(PQ_TILE_ROWS) {
                    let r = PQ_TILE_ROWS.min(rows - j0);
                    let tile = &mut tile[..r * cols];
                    let decode = |(b, rows_of): (usize, &mut [f32])| {
                        let first = j0 + b * PQ_DECODE_ROWS;
                        for (k, row) in rows_of.chunks_exact_mut(cols).enumerate() {
                            self.row_into(first + k, row);
                        }
                    };
                    if par {
                        tile.par_chunks_mut(PQ_DECODE_ROWS * cols)
                            .enumerate()
                            .for_each(decode);
                    } else {
                        tile.chunks_mut(PQ_DECODE_ROWS * cols)
                            .enumerate()
                            .for_each(decode);
                    }
                    matmul(
                        &mut out[j0..],
                        ldo,
                        x,
                        View::rm(tile, r, cols).t(),
                        false,
                        1.0,
                        if par {
                            super::kernels::par_all()
                        } else {
                            gemm::Parallelism::None
                        },
                    );
                }
            }
            Matrix::LowRank { u, v } => {
                let rank = v.rows();
                let mut inner = vec![0.0; n * rank];
                v.apply(x, n, &mut inner, rank);
                u.apply(&inner, n, out, ldo);
            }
        }
    }
}

/// A product of quantized input rows with an integer matrix's stored rows,
/// computed for any users and any range of stored rows
/// ([`Matrix::row_blocks`]); each value is the same bits whatever range it
/// is computed in, and the same as [`Matrix::apply`] gives.
#[derive(Debug)]
pub struct RowBlocks<'a> {
    xq: Vec<i8>,
    xs: Vec<f32>,
    cols: usize,
    values: RowValues<'a>,
    /// One per stored row.
    scale: &'a [f32],
}

/// The stored values as [`RowBlocks`] reads them.
#[derive(Debug)]
enum RowValues<'a> {
    /// Laid out for the panel kernel.
    Panels(&'a simd::PanelSet),
    /// Row-major `int8`, for the portable kernel.
    Int8(&'a [i8]),
    /// Packed `int4` rows, widened a tile at a time for the portable kernel.
    Int4(&'a [u8]),
}

impl RowBlocks<'_> {
    /// Input rows.
    pub fn inputs(&self) -> usize {
        self.xs.len()
    }

    /// Stored rows.
    pub fn rows(&self) -> usize {
        self.scale.len()
    }

    /// A range of stored rows starts at a multiple of this (the panel
    /// kernel's width; 1 for the portable kernel).
    pub fn granule(&self) -> usize {
        match &self.values {
            RowValues::Panels(panels) => panels.width(),
            RowValues::Int8(_) | RowValues::Int4(_) => 1,
        }
    }

    /// `out[(i − users.start) · ldo + j − rows.start]` = the product of input
    /// row `i` and stored row `j`, for `i` in `users` and `j` in `rows`
    /// (`rows.start` a multiple of [`RowBlocks::granule`]).
    pub fn product(&self, users: Range<usize>, rows: Range<usize>, out: &mut [f32], ldo: usize) {
        let cols = self.cols;
        let xq = &self.xq[users.start * cols..users.end * cols];
        let xs = &self.xs[users.clone()];
        match self.values {
            RowValues::Panels(panels) => {
                int8_panel_product(xq, xs, panels, self.scale, rows, out, ldo)
            }
            RowValues::Int8(q) => int8_product(
                xq,
                xs,
                cols,
                &q[rows.start * cols..rows.end * cols],
                &self.scale[rows],
                out,
                ldo,
            ),
            RowValues::Int4(packed) => {
                let width = cols.div_ceil(2);
                let mut tile = vec![0i8; INT4_TILE_ROWS.min(rows.len()) * cols];
                for j0 in rows.clone().step_by(INT4_TILE_ROWS) {
                    let r = INT4_TILE_ROWS.min(rows.end - j0);
                    let tile = &mut tile[..r * cols];
                    widen_int4_rows(&packed[j0 * width..(j0 + r) * width], cols, tile);
                    let o = &mut out[j0 - rows.start..];
                    int8_product(xq, xs, cols, tile, &self.scale[j0..j0 + r], o, ldo);
                }
            }
        }
    }
}

impl crate::model::ItemBlocks for RowBlocks<'_> {
    fn users(&self) -> usize {
        self.inputs()
    }

    fn granule(&self) -> usize {
        RowBlocks::granule(self)
    }

    fn scores(&self, users: Range<usize>, items: Range<usize>, out: &mut [f32]) {
        let width = items.len();
        self.product(users, items, out, width);
    }
}

/// −128 never comes out of quantization; a file holding it is read as −127
/// (keeps the integer kernel free of saturation).
fn clamp_i8(mut q: Vec<i8>) -> Vec<i8> {
    for v in &mut q {
        if *v == i8::MIN {
            *v = -127;
        }
    }
    q
}

/// Element `(j, k)` of an `int4` matrix.
fn int4_at(cols: usize, group: usize, packed: &[u8], scale: &[f32], j: usize, k: usize) -> f32 {
    let width = cols.div_ceil(2);
    scale[j * cols.div_ceil(group) + k / group] * f32::from(nibble(&packed[j * width..], k))
}

/// Rows of an `int4` matrix widened from the packed nibbles (a row's
/// `⌈cols / 2⌉` bytes, low nibble first) to `int8`, `cols` values a row.
fn widen_int4_rows(packed: &[u8], cols: usize, out: &mut [i8]) {
    let width = cols.div_ceil(2);
    for (row, bytes) in out.chunks_exact_mut(cols).zip(packed.chunks_exact(width)) {
        let (pairs, odd) = row.as_chunks_mut::<2>();
        for (pair, &b) in pairs.iter_mut().zip(bytes) {
            *pair = [(b & 0x0f) as i8 - 8, (b >> 4) as i8 - 8];
        }
        if let Some(last) = odd.first_mut() {
            *last = (bytes[width - 1] & 0x0f) as i8 - 8;
        }
    }
}

fn nibble(bytes: &[u8], c: usize) -> i8 {
    let b = bytes[c / 2];
    let n = if c.is_multiple_of(2) {
        b & 0x0f
    } else {
        b >> 4
    };
    n as i8 - 8
}

/// Quantizes each `cols`-wide row of `x` to `int8` with its own scale
/// (`f16`-representable, rounded up): `x ≈ scale · q`.
pub fn quantize_rows_int8(x: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    let rows = x.len().checked_div(cols).unwrap_or(0);
    let mut q = vec![0i8; rows * cols];
    let mut scale = vec![0.0f32; rows];
    for ((row, qrow), s) in x
        .chunks_exact(cols.max(1))
        .zip(q.chunks_exact_mut(cols.max(1)))
        .zip(scale.iter_mut())
    {
        *s = quantize_span(row, I8_MAX, qrow);
    }
    (q, scale)
}

/// Runs `f(first, count, out_from_row_first)` over blocks of the `n`
/// input rows, in parallel when the product is large; each block writes
/// its own output rows.
fn for_user_blocks(
    out: &mut [f32],
    ldo: usize,
    n: usize,
    work: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let threads = rayon::current_num_threads().max(1);
    let block = if work >= PARALLEL_WORK && n > 1 {
        n.div_ceil(threads * 2).max(1)
    } else {
        n
    };
    let end = (n - 1) * ldo + (out.len() - (n - 1) * ldo).min(ldo);
    let used = &mut out[..end];
    used.par_chunks_mut(block * ldo)
        .enumerate()
        .for_each(|(b, o)| {
            let first = b * block;
            f(first, block.min(n - first), o)
        });
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn dense_apply(m: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; n * rows];
        for i in 0..n {
            for j in 0..rows {
                out[i * rows + j] = (0..cols).map(|k| x[i * cols + k] * m[j * cols + k]).sum();
            }
        }
        out
    }

    fn round_trip(m: &Matrix) -> Matrix {
        let encoded = m.encode("w");
        let mut tensors: HashMap<String, (Dtype, Vec<usize>, &[u8])> = encoded
            .iter()
            .map(|(n, d, s, b)| (n.clone(), (*d, s.clone(), b.as_slice())))
            .collect();
        let back = Matrix::decode("w", &m.layout(), &mut tensors).unwrap();
        assert!(tensors.is_empty(), "unused tensors: {:?}", tensors.keys());
        back
    }

    #[test]
    fn int8_error_is_within_half_a_step_per_row() {
        let (rows, cols) = (37, 45);
        let w = random(rows * cols, 1);
        let m = Matrix::quantize_int8(rows, cols, &w);
        let Matrix::Int8 { scale, .. } = &m else {
            panic!()
        };
        let back = m.to_dense();
        for j in 0..rows {
            let max = w[j * cols..(j + 1) * cols]
                .iter()
                .fold(0.0f32, |a, v| a.max(v.abs()));
            assert!(scale[j] >= max / 127.0 && scale[j] <= max / 127.0 * 1.001);
            for k in 0..cols {
                let err = (w[j * cols + k] - back[j * cols + k]).abs();
                assert!(
                    err <= scale[j] / 2.0 + 1e-7,
                    "row {j}: {err} > {}",
                    scale[j] / 2.0
                );
            }
        }
        assert_eq!(round_trip(&m), m);
        // One byte per value plus a 2-byte scale per row.
        assert_eq!(m.stored_bytes(), (rows * cols + 2 * rows) as u64);
    }

    #[test]
    fn int4_error_is_within_half_a_step_per_group() {
        let (rows, cols, group) = (9, 45, 16);
        let w = random(rows * cols, 2);
        let m = Matrix::quantize_int4(rows, cols, group, &w);
        let Matrix::Int4 { scale, .. } = &m else {
            panic!()
        };
        let back = m.to_dense();
        let groups = cols.div_ceil(group);
        for j in 0..rows {
            for k in 0..cols {
                let s = scale[j * groups + k / group];
                let err = (w[j * cols + k] - back[j * cols + k]).abs();
                assert!(err <= s / 2.0 + 1e-7, "({j}, {k}): {err} > {}", s / 2.0);
                // A whole row decoded at once equals each value decoded alone.
                assert_eq!(back[j * cols + k].to_bits(), m.get(j, k).to_bits());
            }
        }
        assert_eq!(round_trip(&m), m);
        // Half a byte per value (rows padded to whole bytes), 2 bytes per group scale.
        assert_eq!(
            m.stored_bytes(),
            (rows * cols.div_ceil(2) + 2 * rows * groups) as u64
        );
    }

    #[test]
    fn products_on_stored_values_equal_dequantized_products() {
        // Column counts exercising the 32-wide steps, the 16-wide step and the scalar tail.
        for (cols, subspaces) in [(70, 5), (48, 12), (16, 4), (5, 5)] {
            let n = 5;
            let x = random(n * cols, 3);
            let w = random(33 * cols, 4);
            let mut sparse_w = w.clone();
            for (i, v) in sparse_w.iter_mut().enumerate() {
                if i % 3 != 0 {
                    *v = 0.0;
                }
            }
            let u = random(33 * 6, 5);
            let v = random(6 * cols, 6);
            let cases = vec![
                Matrix::dense(33, cols, w.clone()),
                Matrix::quantize_int8(33, cols, &w),
                Matrix::quantize_int4(33, cols, 32, &w),
                Matrix::sparsify(33, cols, &sparse_w, false),
                Matrix::sparsify(33, cols, &sparse_w, true),
                Matrix::quantize_pq(33, cols, subspaces, &w, 9),
                Matrix::LowRank {
                    u: Box::new(Matrix::dense(33, 6, u.clone())),
                    v: Box::new(Matrix::dense(6, cols, v.clone())),
                },
            ];
            for m in cases {
                let dense = m.to_dense();
                let want = dense_apply(&dense, 33, cols, &x, n);
                // Written into a wider output (a column block of qkv, say).
                let ldo = 40;
                let mut got = vec![f32::NAN; n * ldo];
                m.apply(&x, n, &mut got, ldo);
                // Input quantization: each x is within half a step of its row's max / 127.
                for i in 0..n {
                    let xmax = x[i * cols..(i + 1) * cols]
                        .iter()
                        .fold(0.0f32, |a, v| a.max(v.abs()));
                    for j in 0..33 {
                        let row_l1: f32 = dense[j * cols..(j + 1) * cols]
                            .iter()
                            .map(|v| v.abs())
                            .sum();
                        let bound = xmax / 127.0 / 2.0 * row_l1 * 1.01 + 1e-4;
                        let (g, w) = (got[i * ldo + j], want[i * 33 + j]);
                        assert!((g - w).abs() <= bound, "{:?}: {g} vs {w}", m.layout());
                    }
                    assert!(got[i * ldo + 33..(i + 1) * ldo].iter().all(|v| v.is_nan()));
                }
                assert_eq!(round_trip(&m), m);
            }
        }
    }

    #[test]
    fn product_quantized_tables_store_a_byte_per_sub_vector_and_decode_checked() {
        // 2,500 rows of 64 values in 16 sub-vectors: 16 code bytes per row
        // plus 16 × 256 × 4 f32 centroids, whatever the row count.
        let (rows, cols, m) = (2500, 64, 16);
        let w = random(rows * cols, 11);
        let q = Matrix::quantize_pq(rows, cols, m, &w, 1);
        assert_eq!(q.stored_bytes(), (rows * m + m * 256 * 4 * 4) as u64);
        assert_eq!(q.layout().scheme(), "pq-16x256");
        assert_eq!(round_trip(&q), q);
        // More rows than a tile (and a last tile that is not a whole number
        // of decoded blocks), enough work to run in parallel, scored whole:
        // the same as the decoded table.
        let x = random(3 * cols, 12);
        let mut got = vec![0.0; 3 * rows];
        q.apply(&x, 3, &mut got, rows);
        let want = dense_apply(&q.to_dense(), rows, cols, &x, 3);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
        }
        let encoded = q.encode("w");
        let decode = |e: &[Encoded], layout: &Layout| {
            let mut view: HashMap<String, (Dtype, Vec<usize>, &[u8])> = e
                .iter()
                .map(|(n, d, s, b)| (n.clone(), (*d, s.clone(), b.as_slice())))
                .collect();
            Matrix::decode("w", layout, &mut view)
        };
        let uneven = Layout::Pq {
            rows,
            cols: 60,
            subspaces: m,
            head: None,
        };
        assert!(decode(&encoded, &uneven).unwrap_err().contains("divide"));
        let mut bad = encoded.clone();
        let book = bad.iter_mut().find(|t| t.0 == "w.codebook").unwrap();
        book.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(decode(&bad, &q.layout()).unwrap_err().contains("codebook"));
        let mut short = encoded.clone();
        short.retain(|t| t.0 != "w.codes");
        assert!(decode(&short, &q.layout()).unwrap_err().contains("w.codes"));
    }

    #[test]
    fn product_quantized_tables_keep_head_rows_whole_and_check_them() {
        // 2,500 rows, rows 3, 700, 2,048 and 2,499 (in different tiles) kept
        // whole in int8: those rows decode from the head, the others from
        // their codes, and the product is the decoded table's.
        let (rows, cols, m) = (2500, 64, 16);
        let w = random(rows * cols, 21);
        let Matrix::Pq {
            codes, codebook, ..
        } = Matrix::quantize_pq(rows, cols, m, &w, 1)
        else {
            unreachable!()
        };
        let head_rows = vec![3u32, 700, 2048, 2499];
        let kept: Vec<f32> = head_rows
            .iter()
            .flat_map(|&r| {
                w[r as usize * cols..(r as usize + 1) * cols]
                    .iter()
                    .copied()
            })
            .collect();
        let values = Matrix::quantize_int8(head_rows.len(), cols, &kept);
        let q = Matrix::Pq {
            rows,
            cols,
            subspaces: m,
            codes: codes.clone(),
            codebook: codebook.clone(),
            head: Some(PqHead::new(head_rows.clone(), values.clone(), rows).unwrap()),
        };
        assert_eq!(q.layout().scheme(), "pq-16x256+head-4(int8-row)");
        // Codes and codebook, then 4 row indices and 4 int8 rows with f16 scales.
        assert_eq!(
            q.stored_bytes(),
            (rows * m + m * 256 * 4 * 4 + 4 * 4 + 4 * cols + 4 * 2) as u64
        );
        assert_eq!(round_trip(&q), q);
        let decoded = q.to_dense();
        let mut row = vec![0.0; cols];
        for j in [0usize, 3, 4, 700, 2047, 2048, 2499] {
            let slot = head_rows.iter().position(|&r| r as usize == j);
            match slot {
                Some(k) => values.row_into(k, &mut row),
                None => pq::row_into(&codes, &codebook, m, j, &mut row),
            }
            assert_eq!(decoded[j * cols..(j + 1) * cols], row[..], "row {j}");
        }
        let x = random(3 * cols, 22);
        let mut got = vec![0.0; 3 * rows];
        q.apply(&x, 3, &mut got, rows);
        let want = dense_apply(&decoded, rows, cols, &x, 3);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
        }
        // Damaged head rows are refused by name: out of order, past the
        // table, a count that does not match the stored rows, or missing.
        let encoded = q.encode("w");
        let decode = |e: &[Encoded]| {
            let mut view: HashMap<String, (Dtype, Vec<usize>, &[u8])> = e
                .iter()
                .map(|(n, d, s, b)| (n.clone(), (*d, s.clone(), b.as_slice())))
                .collect();
            Matrix::decode("w", &q.layout(), &mut view)
        };
        for bad_rows in [[700u32, 3, 2048, 2499], [3, 700, 2048, 2500]] {
            let mut bad = encoded.clone();
            let t = bad.iter_mut().find(|t| t.0 == "w.head_rows").unwrap();
            t.3 = bad_rows.iter().flat_map(|v| v.to_le_bytes()).collect();
            let err = decode(&bad).unwrap_err();
            assert!(
                err.contains("w.head_rows") && err.contains("increasing"),
                "{err}"
            );
        }
        let mut missing = encoded.clone();
        missing.retain(|t| t.0 != "w.head_rows");
        assert!(decode(&missing).unwrap_err().contains("w.head_rows"));
        let mut short = encoded.clone();
        short.retain(|t| t.0 != "w.head.q");
        assert!(decode(&short).unwrap_err().contains("w.head.q"));
        assert!(
            PqHead::new(vec![1, 2], values, rows)
                .unwrap_err()
                .contains("2 head rows for 4")
        );
    }

    #[test]
    fn sparse_files_hold_only_the_kept_values() {
        let (rows, cols) = (20, 40);
        let mut w = random(rows * cols, 8);
        for (i, v) in w.iter_mut().enumerate() {
            if i % 4 != 0 {
                *v = 0.0;
            }
        }
        let nnz = rows * cols / 4;
        let m = Matrix::sparsify(rows, cols, &w, false);
        assert_eq!(m.params(), nnz as u64);
        assert_eq!(m.to_dense(), w);
        // 4 bytes per offset, 2 per index, 4 per value.
        assert_eq!(m.stored_bytes(), (4 * (rows + 1) + 6 * nnz) as u64);
        let q = Matrix::sparsify(rows, cols, &w, true);
        assert_eq!(
            q.stored_bytes(),
            (4 * (rows + 1) + 3 * nnz + 2 * rows) as u64
        );
    }

    #[test]
    fn inconsistent_layouts_are_refused() {
        let m = Matrix::sparsify(
            3,
            4,
            &[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0],
            false,
        );
        let encoded = m.encode("w");
        let tensors = |e: &[Encoded]| -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
            e.iter()
                .map(|(n, d, s, b)| (n.clone(), (*d, s.clone(), b.clone())))
                .collect()
        };
        let decode = |t: &HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>, layout: &Layout| {
            let mut view: HashMap<String, (Dtype, Vec<usize>, &[u8])> = t
                .iter()
                .map(|(n, (d, s, b))| (n.clone(), (*d, s.clone(), b.as_slice())))
                .collect();
            Matrix::decode("w", layout, &mut view)
        };
        let good = tensors(&encoded);
        assert!(decode(&good, &m.layout()).is_ok());
        // An index past the last column.
        let mut bad = good.clone();
        bad.get_mut("w.indices").unwrap().2[0] = 9;
        assert!(decode(&bad, &m.layout()).unwrap_err().contains("indices"));
        // Offsets that run past the values.
        let mut bad = good.clone();
        bad.get_mut("w.indptr").unwrap().2[4] = 200;
        assert!(decode(&bad, &m.layout()).is_err());
        // A layout claiming another shape, a huge one, a nested factorization.
        assert!(
            decode(
                &good,
                &Layout::Sparse {
                    rows: 4,
                    cols: 4,
                    nnz: 4,
                    int8: false
                }
            )
            .is_err()
        );
        assert!(
            decode(
                &good,
                &Layout::F32 {
                    rows: usize::MAX,
                    cols: 2
                }
            )
            .is_err()
        );
        let nested = Layout::LowRank {
            rows: 3,
            cols: 4,
            rank: 1,
            u: Box::new(Layout::Sparse {
                rows: 3,
                cols: 1,
                nnz: 1,
                int8: false,
            }),
            v: Box::new(Layout::F32 { rows: 1, cols: 4 }),
        };
        assert!(decode(&good, &nested).is_err());
        // Negative or NaN scales.
        let q = Matrix::quantize_int8(2, 2, &[1.0, 2.0, 3.0, 4.0]);
        let mut t = tensors(&q.encode("w"));
        t.get_mut("w.scale").unwrap().2[..2].copy_from_slice(&f16::NAN.to_le_bytes());
        assert!(decode(&t, &q.layout()).unwrap_err().contains("scales"));
    }
}
