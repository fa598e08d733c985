//! Integer products on stored `int8` values: the activation rows quantized
//! on the fly, `i32` accumulation, with the kernel chosen once per process
//! from what the CPU has — AVX-512 VNNI, AVX-VNNI, AVX2 (`maddubs`/`madd`)
//! or a portable loop. Every kernel sums the same integers exactly and
//! scales them in the same order, so all of them give the same bits.

use std::ops::Range;
use std::str::FromStr;
use std::sync::OnceLock;

use super::{I8_MAX, ROUNDER};

/// Bytes of packed rows a panel kernel keeps in L1 while every input row
/// of a block runs against them.
const PANEL_TILE_BYTES: usize = 16 << 10;
/// Columns per group in a panel (four `int8` make one `i32` lane).
const PANEL_GROUP: usize = 4;
/// Most stored rows in one panel (AVX-512: sixteen `i32` lanes).
const MAX_PANEL_ROWS: usize = 16;
/// The VNNI kernels multiply unsigned bytes by signed ones: activations are
/// offset by this into `1..=255`, and the offset times each stored row's sum
/// is taken off the integer sum.
const VNNI_OFFSET: i32 = 128;

/// An integer product kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    /// `vpdpbusd` on 512-bit registers: sixteen stored rows × four columns
    /// per instruction.
    Avx512Vnni,
    /// `vpdpbusd` on 256-bit registers (AVX-VNNI): eight rows × four columns.
    AvxVnni,
    /// `vpmaddubsw` + `vpmaddwd` on 256-bit registers.
    Avx2,
    /// Plain Rust on row-major values.
    Portable,
}

impl Int8Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Int8Kernel; 4] = [
        Int8Kernel::Avx512Vnni,
        Int8Kernel::AvxVnni,
        Int8Kernel::Avx2,
        Int8Kernel::Portable,
    ];

    /// The name `bench compress` prints and `--int8-kernel` takes.
    pub fn name(self) -> &'static str {
        match self {
            Int8Kernel::Avx512Vnni => "avx512-vnni",
            Int8Kernel::AvxVnni => "avx-vnni",
            Int8Kernel::Avx2 => "avx2",
            Int8Kernel::Portable => "portable",
        }
    }

    /// Can this CPU run the kernel?
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Int8Kernel::Avx512Vnni => has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
                Int8Kernel::AvxVnni => has!("avx2") && has!("avxvnni"),
                Int8Kernel::Avx2 => has!("avx2"),
                Int8Kernel::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Int8Kernel::Portable
        }
    }

    /// The fastest kernel this CPU runs.
    pub fn detected() -> Int8Kernel {
        Int8Kernel::ALL
            .into_iter()
            .find(|k| k.supported())
            .unwrap_or(Int8Kernel::Portable)
    }

    /// Stored rows side by side in one of this kernel's panels (one
    /// register of `i32` sums); `None` for the portable loop, which reads
    /// the row-major values.
    fn panel_rows(self) -> Option<usize> {
        match self {
            Int8Kernel::Avx512Vnni => Some(16),
            Int8Kernel::AvxVnni | Int8Kernel::Avx2 => Some(8),
            Int8Kernel::Portable => None,
        }
    }
}

impl FromStr for Int8Kernel {
    type Err = String;

    fn from_str(s: &str) -> Result<Int8Kernel, String> {
        Int8Kernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Int8Kernel::ALL.iter().map(|k| k.name()).collect();
                format!("unknown int8 kernel {s:?} (one of {})", names.join(", "))
            })
    }
}

static CHOSEN: OnceLock<Int8Kernel> = OnceLock::new();

/// The kernel this process runs: [`Int8Kernel::detected`] unless
/// [`choose_int8_kernel`] picked another before the first product.
pub fn int8_kernel() -> Int8Kernel {
    *CHOSEN.get_or_init(Int8Kernel::detected)
}

/// Runs `kernel` for every product of this process (benchmarks compare
/// kernels on one machine this way). Fails when the CPU cannot run it or
/// when a product already ran with another.
pub fn choose_int8_kernel(kernel: Int8Kernel) -> Result<(), String> {
    if !kernel.supported() {
        return Err(format!(
            "this CPU cannot run the {} int8 kernel (it runs {})",
            kernel.name(),
            Int8Kernel::ALL
                .iter()
                .filter(|k| k.supported())
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let chosen = *CHOSEN.get_or_init(|| kernel);
    if chosen == kernel {
        Ok(())
    } else {
        Err(format!(
            "the {} int8 kernel already ran in this process; {} cannot replace it",
            chosen.name(),
            kernel.name()
        ))
    }
}

/// A stored `int8` matrix laid out for one panel kernel: rows in panels
/// of the kernel's width (the last padded with zero rows), and within a
/// panel the columns four at a time, each stored row's four values side
/// by side (the last group padded with zeros).
#[derive(Debug, Clone)]
pub(super) struct PanelSet {
    kernel: Int8Kernel,
    rows: usize,
    cols: usize,
    bytes: Vec<i8>,
    /// For the VNNI kernels: `128 · Σ_k q[j, k]` per stored row (padded
    /// to whole panels with zeros); empty otherwise.
    offsets: Vec<i32>,
}

impl PanelSet {
    /// Lays the row-major `rows × cols` values `q` out for `kernel`
    /// (a panel kernel).
    pub(super) fn pack(kernel: Int8Kernel, q: &[i8], rows: usize, cols: usize) -> PanelSet {
        let width = kernel
            .panel_rows()
            .expect("the portable kernel reads row-major values");
        let groups = cols.div_ceil(PANEL_GROUP);
        let padded_rows = rows.div_ceil(width) * width;
        let mut bytes = vec![0i8; padded_rows * groups * PANEL_GROUP];
        for (j, row) in q.chunks_exact(cols.max(1)).take(rows).enumerate() {
            let (panel, lane) = (j / width, j % width);
            for (g, four) in row.chunks(PANEL_GROUP).enumerate() {
                let at = ((panel * groups + g) * width + lane) * PANEL_GROUP;
                bytes[at..at + four.len()].copy_from_slice(four);
            }
        }
        let offsets = if matches!(kernel, Int8Kernel::Avx512Vnni | Int8Kernel::AvxVnni) {
            let mut offsets = vec![0i32; padded_rows];
            for (o, row) in offsets
                .iter_mut()
                .zip(q.chunks_exact(cols.max(1)).take(rows))
            {
                *o = VNNI_OFFSET * row.iter().map(|&v| i32::from(v)).sum::<i32>();
            }
            offsets
        } else {
            Vec::new()
        };
        PanelSet {
            kernel,
            rows,
            cols,
            bytes,
            offsets,
        }
    }

    /// The kernel these panels are laid out for.
    pub(super) fn kernel(&self) -> Int8Kernel {
        self.kernel
    }

    /// Stored rows per panel: a product over some of the rows starts at a
    /// multiple of it.
    pub(super) fn width(&self) -> usize {
        self.kernel.panel_rows().unwrap_or(1)
    }
}

/// `out[i · ldo + j − items.start] = (Σ_k xq[i, k] · q[j, k]) · scale[j] · xs[i]`
/// for every row `i` of `xq` and stored row `j` in `items` (which starts at
/// a multiple of [`PanelSet::width`]), on the panels of `q`. Every value is
/// the same bits whatever range it is computed in. Needs a CPU that runs the
/// panels' kernel.
pub(super) fn int8_panel_product(
    xq: &[i8],
    xs: &[f32],
    panels: &PanelSet,
    scale: &[f32],
    items: Range<usize>,
    out: &mut [f32],
    ldo: usize,
) {
    let kernel = panels.kernel;
    assert!(kernel.supported(), "this CPU cannot run {}", kernel.name());
    assert_eq!(scale.len(), panels.rows, "one scale per stored row");
    assert!(
        items.start.is_multiple_of(panels.width()) && items.end <= panels.rows,
        "items {items:?} are not whole panels' rows of {}",
        panels.rows
    );
    let cols = panels.cols;
    let n = xs.len();
    assert!(xq.len() >= n * cols, "input smaller than n × cols");
    assert!(
        n == 0 || out.len() >= (n - 1) * ldo + items.len(),
        "output too small"
    );
    if items.is_empty() {
        return;
    }
    // Input rows widened to whole groups: for AVX2 as they are plus their
    // absolute values; for VNNI offset into unsigned bytes (x + 128).
    let stride = cols.div_ceil(PANEL_GROUP) * PANEL_GROUP;
    let vnni = kernel != Int8Kernel::Avx2;
    let mut inputs = vec![if vnni { VNNI_OFFSET as u8 as i8 } else { 0 }; n * stride];
    let mut magnitude = if vnni {
        Vec::new()
    } else {
        vec![0i8; n * stride]
    };
    for (i, row) in xq.chunks_exact(cols.max(1)).take(n).enumerate() {
        let f = &mut inputs[i * stride..i * stride + cols];
        if vnni {
            for (f, &v) in f.iter_mut().zip(row) {
                *f = (v as u8 ^ 0x80) as i8;
            }
        } else {
            f.copy_from_slice(row);
            for (m, &v) in magnitude[i * stride..i * stride + cols].iter_mut().zip(row) {
                *m = v.wrapping_abs();
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        let at = Block {
            inputs: &inputs,
            magnitude: &magnitude,
            xs,
            stride,
            groups: stride / PANEL_GROUP,
            panels,
            scale,
            first: items.start,
            end: items.end,
        };
        // SAFETY: the CPU runs the kernel (asserted above); `Block::tiles`
        // hands each block only rows and panels inside the operands.
        unsafe {
            match kernel {
                Int8Kernel::Avx512Vnni => at.tiles(16, 4, out, ldo, |u, b, i, p, out| {
                    at.block_avx512_vnni(u, b, i, p, out, ldo)
                }),
                Int8Kernel::AvxVnni => at.tiles(8, 2, out, ldo, |u, b, i, p, out| {
                    at.block_avx_vnni(u, b, i, p, out, ldo)
                }),
                Int8Kernel::Avx2 => at.tiles(8, 2, out, ldo, |u, b, i, p, out| {
                    at.block_avx2(u, b, i, p, out, ldo)
                }),
                Int8Kernel::Portable => unreachable!("no panels for the portable kernel"),
            }
        }
    }
}

/// The operands of a panel product.
#[cfg(target_arch = "x86_64")]
struct Block<'a> {
    /// Input rows, `stride` bytes each: signed (AVX2) or offset (VNNI).
    inputs: &'a [i8],
    /// AVX2 only: the absolute values of the input rows.
    magnitude: &'a [i8],
    xs: &'a [f32],
    stride: usize,
    groups: usize,
    panels: &'a PanelSet,
    scale: &'a [f32],
    /// The stored row written to each output row's first slot.
    first: usize,
    /// One past the last stored row computed.
    end: usize,
}

/// Runs `$run::<users, $p>` for `users` in `1..=4`.
macro_rules! per_users {
    ($self:ident, $run:ident, $users:expr, $p:literal, $i:expr, $at:expr, $out:expr, $ldo:expr) => {
        match $users {
            4 => $self.$run::<4, $p>($i, $at, $out, $ldo),
            3 => $self.$run::<3, $p>($i, $at, $out, $ldo),
            2 => $self.$run::<2, $p>($i, $at, $out, $ldo),
            _ => $self.$run::<1, $p>($i, $at, $out, $ldo),
        }
    };
}

/// `$name(users, panels, i, p, out, ldo)` runs the register block `$run`
/// for up to four input rows and 1, 2 or (where `$four`) 4 panels.
macro_rules! block {
    ($name:ident, $run:ident, $feature:literal, $four:literal) => {
        #[target_feature(enable = $feature)]
        unsafe fn $name(
            &self,
            users: usize,
            panels: usize,
            i: usize,
            p: usize,
            out: &mut [f32],
            ldo: usize,
        ) {
            // SAFETY: the features are enabled on this function; the caller
            // keeps rows i..i + users and panels p..p + panels inside the
            // operands.
            unsafe {
                match panels {
                    4 if $four => per_users!(self, $run, users, 4, i, p, out, ldo),
                    2 => per_users!(self, $run, users, 2, i, p, out, ldo),
                    _ => per_users!(self, $run, users, 1, i, p, out, ldo),
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
impl Block<'_> {
    /// The panels a tile at a time (in L1), and within a tile blocks of up
    /// to four input rows × `max` (2 or 4) panels held in registers.
    ///
    /// # Safety
    /// `block(users, panels, i, p, out)` must be safe to call for rows
    /// `i..i + users` and panels `p..p + panels`, and must run all of them.
    unsafe fn tiles(
        &self,
        width: usize,
        max: usize,
        out: &mut [f32],
        ldo: usize,
        mut block: impl FnMut(usize, usize, usize, usize, &mut [f32]),
    ) {
        let n = self.xs.len();
        assert!(self.first.is_multiple_of(width) && self.first < self.end);
        assert!(self.end <= self.scale.len());
        let n_panels = self.end.div_ceil(width);
        let panel_bytes = self.groups * width * PANEL_GROUP;
        assert!(self.panels.bytes.len() >= n_panels * panel_bytes);
        assert!(self.inputs.len() >= n * self.stride);
        assert!(self.magnitude.is_empty() || self.magnitude.len() >= n * self.stride);
        assert!(self.panels.offsets.is_empty() || self.panels.offsets.len() >= n_panels * width);
        assert!(n == 0 || out.len() >= (n - 1) * ldo + self.end - self.first);
        let tile = (PANEL_TILE_BYTES / panel_bytes.max(1)).max(max);
        for p0 in (self.first / width..n_panels).step_by(tile) {
            let p1 = (p0 + tile).min(n_panels);
            let mut i = 0;
            while i < n {
                let users = (n - i).min(4);
                let mut p = p0;
                while p < p1 {
                    let panels = match p1 - p {
                        left if left >= max => max,
                        left if left >= 2 => 2,
                        _ => 1,
                    };
                    block(users, panels, i, p, out);
                    p += panels;
                }
                i += users;
            }
        }
    }

    block!(block_avx2, run_avx2, "avx2", false);
    block!(block_avx_vnni, run_avx_vnni, "avx2,avxvnni", false);
    block!(
        block_avx512_vnni,
        run_avx512_vnni,
        "avx512f,avx512bw,avx512vnni",
        true
    );

    /// Pointers to rows `i..i + U` of `bytes` (each `stride` long).
    #[inline]
    fn rows<const U: usize>(&self, bytes: &[i8], i: usize) -> [*const i8; U] {
        assert!(
            (i + U) * self.stride <= bytes.len(),
            "input rows out of range"
        );
        std::array::from_fn(|u| bytes[(i + u) * self.stride..].as_ptr())
    }

    /// Pointers to panels `p..p + P` of `width` rows.
    #[inline]
    fn panel_starts<const P: usize>(&self, p: usize, width: usize) -> [*const i8; P] {
        let panel_bytes = self.groups * width * PANEL_GROUP;
        assert!(
            (p + P) * panel_bytes <= self.panels.bytes.len(),
            "panels out of range"
        );
        std::array::from_fn(|b| self.panels.bytes[(p + b) * panel_bytes..].as_ptr())
    }

    /// The scales of stored rows `j..j + width` (zeros past the last row
    /// computed) and how many of them are real.
    #[inline(always)]
    fn scales(&self, j: usize, width: usize) -> ([f32; MAX_PANEL_ROWS], usize) {
        let live = (self.end - j).min(width);
        let mut scales = [0.0f32; MAX_PANEL_ROWS];
        // A whole panel copies a constant length once inlined (`width` is
        // the kernel's constant): no `memmove` call per block, as a
        // copy of `live` values would make.
        if live == width {
            scales[..width].copy_from_slice(&self.scale[j..j + width]);
        } else {
            for (s, &v) in scales.iter_mut().zip(&self.scale[j..j + live]) {
                *s = v;
            }
        }
        (scales, live)
    }

    /// Input rows `i..i + U` against panels `p..p + P`: per group of four
    /// columns, each input row's four values broadcast, `maddubs` of their
    /// magnitudes with the panel signed by them, `madd` into `i32` lanes
    /// (one per stored row: no horizontal sums), then scaled and stored.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn run_avx2<const U: usize, const P: usize>(
        &self,
        i: usize,
        p: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        use std::arch::x86_64::*;
        const W: usize = 8;
        let (x_rows, m_rows) = (
            self.rows::<U>(self.inputs, i),
            self.rows::<U>(self.magnitude, i),
        );
        let w_rows = self.panel_starts::<P>(p, W);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); P]; U];
        for g in 0..self.groups {
            // SAFETY (every read below): group g < groups lies inside each
            // input row (stride = 4 · groups) and each panel (asserted by
            // `rows` and `panel_starts`).
            let w: [__m256i; P] = std::array::from_fn(|b| unsafe {
                _mm256_loadu_si256(w_rows[b].add(g * W * PANEL_GROUP) as *const __m256i)
            });
            for u in 0..U {
                let (x, m) = unsafe {
                    (
                        (x_rows[u].add(g * PANEL_GROUP) as *const i32).read_unaligned(),
                        (m_rows[u].add(g * PANEL_GROUP) as *const i32).read_unaligned(),
                    )
                };
                let (x, m) = (_mm256_set1_epi32(x), _mm256_set1_epi32(m));
                for (a, &w) in acc[u].iter_mut().zip(&w) {
                    let pairs = _mm256_maddubs_epi16(m, _mm256_sign_epi8(w, x));
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for b in 0..P {
            let j = (p + b) * W;
            let (scales, live) = self.scales(j, W);
            // SAFETY: eight floats on the stack.
            let scales = unsafe { _mm256_loadu_ps(scales.as_ptr()) };
            for (u, acc) in acc.iter().enumerate() {
                let sums = _mm256_cvtepi32_ps(acc[b]);
                let v = _mm256_mul_ps(_mm256_mul_ps(sums, scales), _mm256_set1_ps(self.xs[i + u]));
                // SAFETY: AVX2 is enabled here.
                unsafe { store8(v, out, (i + u) * ldo + j - self.first, live) };
            }
        }
    }

    /// As [`Block::run_avx2`] with one `vpdpbusd` (AVX-VNNI) per input row,
    /// panel and group on the offset input values; the offset is taken off
    /// once per stored row at the end.
    #[target_feature(enable = "avx2,avxvnni")]
    #[inline]
    unsafe fn run_avx_vnni<const U: usize, const P: usize>(
        &self,
        i: usize,
        p: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        use std::arch::x86_64::*;
        const W: usize = 8;
        let x_rows = self.rows::<U>(self.inputs, i);
        let w_rows = self.panel_starts::<P>(p, W);
        let mut acc = [[_mm256_setzero_si256(); P]; U];
        for g in 0..self.groups {
            // SAFETY (every read below): as in `run_avx2`.
            let w: [__m256i; P] = std::array::from_fn(|b| unsafe {
                _mm256_loadu_si256(w_rows[b].add(g * W * PANEL_GROUP) as *const __m256i)
            });
            for u in 0..U {
                let x = unsafe { (x_rows[u].add(g * PANEL_GROUP) as *const i32).read_unaligned() };
                let x = _mm256_set1_epi32(x);
                for (a, &w) in acc[u].iter_mut().zip(&w) {
                    *a = _mm256_dpbusd_avx_epi32(*a, x, w);
                }
            }
        }
        for b in 0..P {
            let j = (p + b) * W;
            let (scales, live) = self.scales(j, W);
            let offsets = &self.panels.offsets[j..j + W];
            // SAFETY: eight floats on the stack; eight offsets (padded to
            // whole panels by `PanelSet::pack`).
            let (scales, offsets) = unsafe {
                (
                    _mm256_loadu_ps(scales.as_ptr()),
                    _mm256_loadu_si256(offsets.as_ptr() as *const __m256i),
                )
            };
            for (u, acc) in acc.iter().enumerate() {
                let sums = _mm256_cvtepi32_ps(_mm256_sub_epi32(acc[b], offsets));
                let v = _mm256_mul_ps(_mm256_mul_ps(sums, scales), _mm256_set1_ps(self.xs[i + u]));
                // SAFETY: AVX2 is enabled here.
                unsafe { store8(v, out, (i + u) * ldo + j - self.first, live) };
            }
        }
    }

    /// As [`Block::run_avx_vnni`] on 512-bit registers: sixteen stored rows
    /// per panel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn run_avx512_vnni<const U: usize, const P: usize>(
        &self,
        i: usize,
        p: usize,
        out: &mut [f32],
        ldo: usize,
    ) {
        use std::arch::x86_64::*;
        const W: usize = 16;
        let x_rows = self.rows::<U>(self.inputs, i);
        let w_rows = self.panel_starts::<P>(p, W);
        let mut acc = [[_mm512_setzero_si512(); P]; U];
        for g in 0..self.groups {
            // SAFETY (every read below): as in `run_avx2`.
            let w: [__m512i; P] = std::array::from_fn(|b| unsafe {
                _mm512_loadu_si512(w_rows[b].add(g * W * PANEL_GROUP) as *const _)
            });
            for u in 0..U {
                let x = unsafe { (x_rows[u].add(g * PANEL_GROUP) as *const i32).read_unaligned() };
                let x = _mm512_set1_epi32(x);
                for (a, &w) in acc[u].iter_mut().zip(&w) {
                    *a = _mm512_dpbusd_epi32(*a, x, w);
                }
            }
        }
        for b in 0..P {
            let j = (p + b) * W;
            let (scales, live) = self.scales(j, W);
            let offsets = &self.panels.offsets[j..j + W];
            // SAFETY: sixteen floats on the stack; sixteen offsets (padded
            // to whole panels by `PanelSet::pack`).
            let (scales, offsets) = unsafe {
                (
                    _mm512_loadu_ps(scales.as_ptr()),
                    _mm512_loadu_si512(offsets.as_ptr() as *const _),
                )
            };
            let mask: __mmask16 = if live == W { !0 } else { (1u16 << live) - 1 };
            for (u, acc) in acc.iter().enumerate() {
                let sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[b], offsets));
                let v = _mm512_mul_ps(_mm512_mul_ps(sums, scales), _mm512_set1_ps(self.xs[i + u]));
                let o = (i + u) * ldo + j - self.first;
                assert!(o + live <= out.len());
                // SAFETY: the mask writes only the `live` floats from `o`,
                // inside `out` (asserted just above).
                unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(o), mask, v) };
            }
        }
    }
}

/// Stores the first `live` (≤ 8) lanes of `v` at `out[o..]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store8(v: std::arch::x86_64::__m256, out: &mut [f32], o: usize, live: usize) {
    use std::arch::x86_64::*;
    let dst = &mut out[o..o + live];
    if live == 8 {
        // SAFETY: `dst` holds eight floats.
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) };
    } else {
        let mut lanes = [0.0f32; 8];
        // SAFETY: eight floats on the stack.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        dst.copy_from_slice(&lanes[..live]);
    }
}

/// `out[i · ldo + j] = (Σ_k xq[i, k] · q[j, k]) · scale[j] · xs[i]` for every
/// row `i` of `xq` and every stored row `j` (`scale.len()` of them), on
/// row-major stored values: the portable product, rounding like the panel
/// product.
pub(super) fn int8_product(
    xq: &[i8],
    xs: &[f32],
    cols: usize,
    q: &[i8],
    scale: &[f32],
    out: &mut [f32],
    ldo: usize,
) {
    for (i, &s) in xs.iter().enumerate() {
        let x = &xq[i * cols..(i + 1) * cols];
        for (j, &sj) in scale.iter().enumerate() {
            out[i * ldo + j] = dot_i8_portable(x, &q[j * cols..(j + 1) * cols]) as f32 * sj * s;
        }
    }
}

/// Quantizes each `cols`-wide row of activations to `int8` with an `f32`
/// scale of its own (max |x| / 127). The same arithmetic compiled for AVX2
/// where the CPU has it (wider vectors for the rounding and the narrowing).
pub(super) fn quantize_activations(x: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            return unsafe { quantize_activations_avx2(x, cols) };
        }
    }
    quantize_rows(x, cols)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_activations_avx2(x: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    quantize_rows(x, cols)
}

#[inline(always)]
fn quantize_rows(x: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    let rows = x.len() / cols;
    let mut q = vec![0i8; rows * cols];
    let mut scale = vec![0.0f32; rows];
    for ((row, qrow), s) in x
        .chunks_exact(cols)
        .zip(q.chunks_exact_mut(cols))
        .zip(scale.iter_mut())
    {
        let max = max_abs(row);
        if max > 0.0 && max.is_finite() {
            *s = max / I8_MAX;
            let inv = I8_MAX / max;
            for (o, &v) in qrow.iter_mut().zip(row) {
                // Round to nearest by the 1.5·2²³ trick (|v · inv| ≤ 127):
                // the sum's low mantissa bits are the rounded integer, read
                // as bits (a float-to-integer cast saturates, which does
                // not vectorize); a NaN gives 0, as the cast did.
                let t = v * inv + ROUNDER;
                let n = (t.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
                *o = if t.is_nan() { 0 } else { n as i8 };
            }
        }
    }
    (q, scale)
}

/// The largest `|v|` of `values` (0 when empty), NaNs passed over: sixteen
/// lanes side by side, which vectorizes (a fold over `f32::max` does not).
#[inline(always)]
fn max_abs(values: &[f32]) -> f32 {
    let larger = |m: f32, v: f32| if v.abs() > m { v.abs() } else { m };
    let mut lanes = [0.0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = larger(*l, v);
        }
    }
    let rest = chunks.remainder().iter().fold(0.0f32, |m, &v| larger(m, v));
    lanes.into_iter().fold(rest, larger)
}

/// `dots[i] = Σ_k xq[i · stride + offset + k] · row[k]` for `count` rows of `xq`.
pub(super) fn dots_into(
    xq: &[i8],
    count: usize,
    stride: usize,
    offset: usize,
    row: &[i8],
    dots: &mut [i32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if row.len() >= 32 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            unsafe { dots_avx2(xq, count, stride, offset, row, dots) };
            return;
        }
    }
    for (i, d) in dots.iter_mut().enumerate().take(count) {
        let x = &xq[i * stride + offset..i * stride + offset + row.len()];
        *d = dot_i8_portable(x, row);
    }
}

/// Four rows of `xq` against one stored row at a time: the row's absolute
/// values are computed once per 32 columns and the four sums reduced
/// together.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dots_avx2(
    xq: &[i8],
    count: usize,
    stride: usize,
    offset: usize,
    row: &[i8],
    dots: &mut [i32],
) {
    use std::arch::x86_64::*;
    let len = row.len();
    let full = len / 32 * 32;
    assert!(count == 0 || (count - 1) * stride + offset + len <= xq.len());
    assert!(dots.len() >= count);
    let ones = _mm256_set1_epi16(1);
    let load = |p: *const i8| {
        // SAFETY: every pointer below stays inside `xq` or `row` (asserted above).
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    };
    let mut i = 0;
    while i + 4 <= count {
        let mut acc = [_mm256_setzero_si256(); 4];
        let mut k = 0;
        while k < full {
            // SAFETY: k + 32 ≤ full ≤ len.
            let r = load(unsafe { row.as_ptr().add(k) });
            let abs_r = _mm256_sign_epi8(r, r);
            for (u, a) in acc.iter_mut().enumerate() {
                // SAFETY: (i + u) < count, so the 32 bytes lie inside xq.
                let x = load(unsafe { xq.as_ptr().add((i + u) * stride + offset + k) });
                let pairs = _mm256_maddubs_epi16(abs_r, _mm256_sign_epi8(x, r));
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(pairs, ones));
            }
            k += 32;
        }
        let h = _mm256_hadd_epi32(
            _mm256_hadd_epi32(acc[0], acc[1]),
            _mm256_hadd_epi32(acc[2], acc[3]),
        );
        let s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        let mut sums = [0i32; 4];
        // SAFETY: `sums` holds four i32.
        unsafe { _mm_storeu_si128(sums.as_mut_ptr() as *mut __m128i, s) };
        if full == len {
            dots[i..i + 4].copy_from_slice(&sums);
        } else {
            for (u, sum) in sums.iter().enumerate() {
                let base = (i + u) * stride + offset;
                dots[i + u] = sum + dot_i8_portable(&xq[base + full..base + len], &row[full..]);
            }
        }
        i += 4;
    }
    for (u, d) in dots.iter_mut().enumerate().take(count).skip(i) {
        let base = u * stride + offset;
        *d = dot_i8(&xq[base..base + len], row);
    }
}

/// `Σ a_k · b_k` in `i32`. Inputs lie in `[-127, 127]`.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    {
        if a.len() >= 32 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present (checked just above).
            return unsafe { dot_i8_avx2(a, b) };
        }
    }
    dot_i8_portable(a, b)
}

pub(super) fn dot_i8_portable(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i32::from(x) * i32::from(y))
        .sum()
}

/// 32 products per step: `maddubs(|a|, sign(b, a))` pairs them into `i16`
/// (at most 2 · 127 · 127, no saturation), `madd` with ones into `i32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = _mm256_setzero_si256();
    let ones = _mm256_set1_epi16(1);
    let mut k = 0;
    while k + 32 <= n {
        // SAFETY: k + 32 ≤ n ≤ both lengths; unaligned loads.
        let (va, vb) = unsafe {
            (
                _mm256_loadu_si256(a.as_ptr().add(k) as *const __m256i),
                _mm256_loadu_si256(b.as_ptr().add(k) as *const __m256i),
            )
        };
        let abs_a = _mm256_sign_epi8(va, va);
        let signed_b = _mm256_sign_epi8(vb, va);
        let pairs = _mm256_maddubs_epi16(abs_a, signed_b);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
        k += 32;
    }
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(acc),
        _mm256_extracti128_si256(acc, 1),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s) + dot_i8_portable(&a[k..n], &b[k..n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn every_panel_kernel_equals_the_portable_product_on_any_shape() {
        let kernels: Vec<Int8Kernel> = Int8Kernel::ALL
            .into_iter()
            .filter(|k| k.supported() && k.panel_rows().is_some())
            .collect();
        // The chosen kernel is one this CPU runs, and the best of them.
        assert!(int8_kernel().supported());
        assert_eq!(
            Int8Kernel::detected(),
            Int8Kernel::ALL.into_iter().find(|k| k.supported()).unwrap()
        );
        let mut rng = StdRng::seed_from_u64(17);
        for case in 0..400 {
            let n = rng.random_range(0..11);
            // Now and then more rows than one L1 tile of panels holds.
            let rows = if case % 25 == 0 {
                rng.random_range(200..700)
            } else {
                rng.random_range(1..60)
            };
            let cols = rng.random_range(1..75);
            let extreme = case % 10 == 0;
            let value = |rng: &mut StdRng| {
                if extreme {
                    [-127i8, 127][rng.random_range(0..2)]
                } else {
                    rng.random_range(-127..=127)
                }
            };
            let xq: Vec<i8> = (0..n * cols).map(|_| value(&mut rng)).collect();
            let q: Vec<i8> = (0..rows * cols).map(|_| value(&mut rng)).collect();
            let xs: Vec<f32> = (0..n).map(|_| rng.random_range(0.001..1.0)).collect();
            let scale: Vec<f32> = (0..rows).map(|_| rng.random_range(0.001..1.0)).collect();
            // Output rows wider than the product: the slots past `rows` stay.
            let ldo = rows + rng.random_range(0..4);
            let mut want = vec![f32::NAN; n * ldo];
            int8_product(&xq, &xs, cols, &q, &scale, &mut want, ldo);
            for &kernel in &kernels {
                let panels = PanelSet::pack(kernel, &q, rows, cols);
                let mut got = vec![f32::NAN; n * ldo];
                int8_panel_product(&xq, &xs, &panels, &scale, 0..rows, &mut got, ldo);
                for (at, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits(),
                        "{} case {case}: n {n}, rows {rows}, cols {cols}, ldo {ldo}, at {at}: {g} vs {w}",
                        kernel.name()
                    );
                }
                // Some of the rows, from a whole panel on: the same bits in
                // their own output rows, nothing written past them.
                let width = panels.width();
                let start = rng.random_range(0..rows.div_ceil(width)) * width;
                let end = rng.random_range(start + 1..=rows);
                let part = end - start;
                let mut got = vec![f32::NAN; n * part + 1];
                int8_panel_product(&xq, &xs, &panels, &scale, start..end, &mut got, part);
                for i in 0..n {
                    for j in start..end {
                        let (g, w) = (got[i * part + j - start], want[i * ldo + j]);
                        assert!(
                            g.to_bits() == w.to_bits(),
                            "{} case {case}: rows {start}..{end} of {rows}, user {i}, row {j}: {g} vs {w}",
                            kernel.name()
                        );
                    }
                }
                assert!(got[n * part].is_nan(), "written past the range's output");
            }
        }
    }

    #[test]
    fn kernels_are_named_and_only_supported_ones_can_be_chosen() {
        for kernel in Int8Kernel::ALL {
            assert_eq!(kernel.name().parse::<Int8Kernel>(), Ok(kernel));
        }
        let unknown = "avx1024".parse::<Int8Kernel>().unwrap_err();
        assert!(
            unknown.contains("avx1024") && unknown.contains("avx512-vnni"),
            "{unknown}"
        );
        assert!(Int8Kernel::Portable.supported());
        // The process's kernel can be chosen again, never changed.
        let chosen = int8_kernel();
        assert_eq!(choose_int8_kernel(chosen), Ok(()));
        for other in Int8Kernel::ALL.into_iter().filter(|&k| k != chosen) {
            let err = choose_int8_kernel(other).unwrap_err();
            assert!(err.contains(other.name()), "{err}");
        }
    }

    #[test]
    fn activations_quantize_alike_with_and_without_avx2() {
        let mut rng = StdRng::seed_from_u64(5);
        for cols in [1, 7, 16, 32, 45] {
            let x: Vec<f32> = (0..cols * 40)
                .map(|i| match (i % 97, rng.random_range(0..50)) {
                    (13, _) => f32::NAN,
                    (29, _) => f32::INFINITY,
                    (_, 0) => 0.0,
                    _ => rng.random_range(-3.0..3.0),
                })
                .collect();
            let (q, s) = quantize_activations(&x, cols);
            let (want_q, want_s) = quantize_rows(&x, cols);
            assert_eq!(q, want_q, "cols {cols}");
            assert_eq!(s, want_s, "cols {cols}");
            // The bits trick rounds like `((v · inv + R) − R) as i8`.
            for ((row, qrow), &s) in x.chunks(cols).zip(q.chunks(cols)).zip(&s) {
                let inv = if s > 0.0 { I8_MAX / max_abs(row) } else { 0.0 };
                for (&v, &q) in row.iter().zip(qrow) {
                    let want = if s > 0.0 {
                        ((v * inv + ROUNDER) - ROUNDER) as i8
                    } else {
                        0
                    };
                    assert_eq!(q, want, "{v} · {inv}");
                }
            }
            // Each value within half a step of its row's scale.
            for ((row, qrow), &s) in x.chunks(cols).zip(q.chunks(cols)).zip(&s) {
                for (&v, &q) in row.iter().zip(qrow) {
                    if s > 0.0 && v.is_finite() {
                        assert!(
                            (v - s * f32::from(q)).abs() <= s / 2.0 + 1e-6,
                            "{v} vs {q}·{s}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn max_abs_equals_a_fold_over_f32_max() {
        let mut rng = StdRng::seed_from_u64(3);
        for len in [0, 1, 15, 16, 17, 32, 45, 100] {
            for _ in 0..20 {
                let values: Vec<f32> = (0..len)
                    .map(|_| match rng.random_range(0..20) {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        2 => -0.0,
                        _ => rng.random_range(-5.0..5.0),
                    })
                    .collect();
                let want = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert_eq!(max_abs(&values).to_bits(), want.to_bits(), "{values:?}");
            }
        }
    }

    #[test]
    fn the_avx2_dot_equals_the_portable_one() {
        let mut rng = StdRng::seed_from_u64(7);
        for len in [0, 1, 31, 32, 33, 64, 100, 512] {
            let a: Vec<i8> = (0..len).map(|_| rng.random_range(-127..=127)).collect();
            let b: Vec<i8> = (0..len).map(|_| rng.random_range(-127..=127)).collect();
            assert_eq!(dot_i8(&a, &b), dot_i8_portable(&a, &b), "len {len}");
        }
        let extreme = vec![-127i8; 64];
        assert_eq!(dot_i8(&extreme, &extreme), 64 * 127 * 127);
    }
}
