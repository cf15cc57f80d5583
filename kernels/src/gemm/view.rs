//! Strided matrix views: a slice plus `rows × cols` and a stride per dimension, so that a
//! GEMM can read a transpose or a sub-matrix where it lies instead of copying it.
//!
//! Element `(i, j)` of a view lives at `data[i·row_stride + j·col_stride]`; element
//! `(0, 0)` is `data[0]` (slice the buffer to move the origin).
//!
//! Invariants, checked once by the constructors so that kernels can rely on them:
//! - every addressed element lies inside `data` (the smallest and largest offsets are
//!   computed in wide arithmetic, so no overflow slips through). Since the origin is
//!   `data[0]`, this means a negative stride is accepted only along a dimension of extent
//!   1, where it addresses nothing; a view with 0 rows or 0 columns addresses nothing and
//!   accepts any strides;
//! - a [`MatMut`] additionally never maps two distinct elements to the same offset, so a
//!   kernel may write its elements in any order, from any thread. A [`MatRef`] may alias
//!   (a zero stride broadcasts a row or column), which is harmless for reads.
//!
//! Each view carries the name of the tensor it holds, which errors quote.

use crate::KernelError;
use std::fmt;

/// Checks that every element of a `rows × cols` view with these strides lies in a buffer
/// of `len` elements.
fn check_bounds(
    tensor: &'static str,
    len: usize,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
) -> Result<(), KernelError> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let overflow = || KernelError::InvalidShape {
        tensor,
        detail: format!(
            "a {rows}×{cols} view with strides ({row_stride}, {col_stride}) overflows its offsets"
        ),
    };
    // Offset of the far element along one dimension; i128 holds usize × isize exactly.
    let extent = |n: usize, stride: isize| (n as i128 - 1) * stride as i128;
    let (r, c) = (extent(rows, row_stride), extent(cols, col_stride));
    let min = r.min(0).checked_add(c.min(0)).ok_or_else(overflow)?;
    let max = r.max(0).checked_add(c.max(0)).ok_or_else(overflow)?;
    if min < 0 {
        return Err(KernelError::InvalidShape {
            tensor,
            detail: format!(
                "a {rows}×{cols} view with strides ({row_stride}, {col_stride}) reaches offset {min}, \
                 before the start of its buffer (element (0, 0) is the buffer's first)"
            ),
        });
    }
    if max >= len as i128 {
        return Err(KernelError::InvalidShape {
            tensor,
            detail: format!(
                "a {rows}×{cols} view with strides ({row_stride}, {col_stride}) reaches offset {max}, \
                 past the end of its {len}-element buffer"
            ),
        });
    }
    Ok(())
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Checks that no two distinct elements of the view share an offset.
///
/// Two elements collide when `di·rs + dj·cs = 0` for some `(di, dj) ≠ (0, 0)` with
/// `|di| < rows` and `|dj| < cols`. With both strides non-zero and `g = gcd(|rs|, |cs|)`,
/// the smallest such step is `(|cs|/g, |rs|/g)`, so the view aliases exactly when
/// `|cs|/g < rows` and `|rs|/g < cols`. This is exact: it accepts every non-aliasing
/// layout, not only the "one stride spans the other dimension" ones.
fn check_no_alias(
    tensor: &'static str,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
) -> Result<(), KernelError> {
    let aliases = if rows <= 1 || cols <= 1 {
        (rows > 1 && row_stride == 0) || (cols > 1 && col_stride == 0)
    } else if row_stride == 0 || col_stride == 0 {
        true
    } else {
        let (rs, cs) = (row_stride.unsigned_abs() as u128, col_stride.unsigned_abs() as u128);
        let g = gcd(rs, cs);
        cs / g < rows as u128 && rs / g < cols as u128
    };
    if aliases {
        return Err(KernelError::InvalidShape {
            tensor,
            detail: format!(
                "a writable {rows}×{cols} view with strides ({row_stride}, {col_stride}) maps two \
                 elements to the same offset"
            ),
        });
    }
    Ok(())
}

fn check_row_major(tensor: &'static str, len: usize, rows: usize, cols: usize) -> Result<isize, KernelError> {
    crate::check_matrix_len(tensor, rows, cols, len)?;
    // A slice never exceeds isize::MAX bytes, so `cols ≤ len` fits (and cols is unused
    // as a stride when rows ≤ 1, where it may be anything).
    Ok(isize::try_from(cols).unwrap_or(isize::MAX))
}

/// A read-only strided view of a matrix: element `(i, j)` is
/// `data[i·row_stride + j·col_stride]`, element `(0, 0)` is `data[0]` (slice the buffer to
/// move the origin).
///
/// The constructors check that every element lies inside `data`, so a negative stride is
/// accepted only along a dimension of extent 1 (where it addresses nothing), and a view
/// with 0 rows or columns accepts any strides. Elements may alias: a zero stride
/// broadcasts a row or a column.
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
    name: &'static str,
}

impl<T> Clone for MatRef<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for MatRef<'_, T> {}

impl<T> fmt::Debug for MatRef<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatRef")
            .field("name", &self.name)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("row_stride", &self.row_stride)
            .field("col_stride", &self.col_stride)
            .field("buffer_len", &self.data.len())
            .finish()
    }
}

impl<'a, T> MatRef<'a, T> {
    /// A `rows × cols` view of `data` with element `(i, j)` at
    /// `data[i·row_stride + j·col_stride]`; fails unless every element lies inside `data`.
    pub fn new(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: isize,
        col_stride: isize,
        name: &'static str,
    ) -> Result<Self, KernelError> {
        check_bounds(name, data.len(), rows, cols, row_stride, col_stride)?;
        Ok(Self { data, rows, cols, row_stride, col_stride, name })
    }

    /// A contiguous row-major view; `data` must hold exactly `rows · cols` elements.
    pub fn row_major(
        data: &'a [T],
        rows: usize,
        cols: usize,
        name: &'static str,
    ) -> Result<Self, KernelError> {
        let row_stride = check_row_major(name, data.len(), rows, cols)?;
        Ok(Self { data, rows, cols, row_stride, col_stride: 1, name })
    }

    /// The transpose, as a view of the same elements (dimensions and strides swapped).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Offset between consecutive rows, in elements.
    pub fn row_stride(&self) -> isize {
        self.row_stride
    }

    /// Offset between consecutive columns, in elements.
    pub fn col_stride(&self) -> isize {
        self.col_stride
    }

    /// The tensor name errors quote.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The underlying buffer.
    pub fn data(&self) -> &'a [T] {
        self.data
    }

    /// Element `(i, j)`, or `None` outside the view.
    pub fn get(&self, i: usize, j: usize) -> Option<&'a T> {
        if i >= self.rows || j >= self.cols {
            return None;
        }
        self.data.get(offset(i, j, self.row_stride, self.col_stride))
    }
}

/// Offset of `(i, j)` for indices inside a checked view: every partial sum is bounded by
/// the largest offset, which the constructor proved lies inside the buffer.
#[inline(always)]
pub(crate) fn offset(i: usize, j: usize, row_stride: isize, col_stride: isize) -> usize {
    (i as isize * row_stride + j as isize * col_stride) as usize
}

/// A writable strided view of a matrix, laid out as a [`MatRef`], in which no two
/// distinct elements share an offset (checked exactly by the constructors), so a kernel
/// may write its elements in any order, from any thread.
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
    name: &'static str,
}

impl<T> fmt::Debug for MatMut<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatMut")
            .field("name", &self.name)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("row_stride", &self.row_stride)
            .field("col_stride", &self.col_stride)
            .field("buffer_len", &self.data.len())
            .finish()
    }
}

impl<'a, T> MatMut<'a, T> {
    /// A `rows × cols` writable view of `data` with element `(i, j)` at
    /// `data[i·row_stride + j·col_stride]`; fails unless every element lies inside `data`
    /// and no two distinct elements share an offset.
    pub fn new(
        data: &'a mut [T],
        rows: usize,
        cols: usize,
        row_stride: isize,
        col_stride: isize,
        name: &'static str,
    ) -> Result<Self, KernelError> {
        check_bounds(name, data.len(), rows, cols, row_stride, col_stride)?;
        check_no_alias(name, rows, cols, row_stride, col_stride)?;
        Ok(Self { data, rows, cols, row_stride, col_stride, name })
    }

    /// A contiguous row-major view; `data` must hold exactly `rows · cols` elements.
    pub fn row_major(
        data: &'a mut [T],
        rows: usize,
        cols: usize,
        name: &'static str,
    ) -> Result<Self, KernelError> {
        let row_stride = check_row_major(name, data.len(), rows, cols)?;
        Ok(Self { data, rows, cols, row_stride, col_stride: 1, name })
    }

    /// The transpose, as a view of the same elements (dimensions and strides swapped).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// A read-only view of the same elements, borrowing this one.
    pub fn as_ref(&self) -> MatRef<'_, T> {
        MatRef {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
            name: self.name,
        }
    }

    /// A shorter-lived writable view of the same elements, so this one can be used again.
    pub fn reborrow(&mut self) -> MatMut<'_, T> {
        MatMut {
            data: self.data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
            name: self.name,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Offset between consecutive rows, in elements.
    pub fn row_stride(&self) -> isize {
        self.row_stride
    }

    /// Offset between consecutive columns, in elements.
    pub fn col_stride(&self) -> isize {
        self.col_stride
    }

    /// The tensor name errors quote.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Element `(i, j)`, or `None` outside the view.
    pub fn get(&self, i: usize, j: usize) -> Option<&T> {
        if i >= self.rows || j >= self.cols {
            return None;
        }
        self.data.get(offset(i, j, self.row_stride, self.col_stride))
    }

    /// Element `(i, j)` for writing, or `None` outside the view.
    pub fn get_mut(&mut self, i: usize, j: usize) -> Option<&mut T> {
        if i >= self.rows || j >= self.cols {
            return None;
        }
        self.data.get_mut(offset(i, j, self.row_stride, self.col_stride))
    }

    /// Base pointer for the GEMM kernel, which addresses exactly the view's elements.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut T {
        self.data.as_mut_ptr()
    }

    /// Applies `f` to every element, row by row.
    pub(crate) fn for_each_mut(&mut self, mut f: impl FnMut(&mut T)) {
        for i in 0..self.rows {
            for j in 0..self.cols {
                f(&mut self.data[offset(i, j, self.row_stride, self.col_stride)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked_on_both_ends() {
        let data = [0f32; 12];
        assert!(MatRef::new(&data, 3, 4, 4, 1, "x").is_ok());
        assert!(MatRef::new(&data, 3, 4, 5, 1, "x").is_err(), "last row runs past the end");
        assert!(MatRef::new(&data, 4, 3, 1, 4, "x").is_ok(), "column-major");
        assert!(MatRef::new(&data, 2, 2, -1, 1, "x").is_err(), "negative stride reaches before data[0]");
        assert!(MatRef::new(&data, 1, 2, -7, 1, "x").is_ok(), "stride of an extent-1 dimension is unused");
        assert!(MatRef::new(&data[..0], 0, 5, 1000, 1000, "x").is_ok());
        assert!(MatRef::new(&data, 2, 2, isize::MAX, isize::MAX, "x").is_err());
        assert!(MatRef::row_major(&data, 3, 5, "x").is_err());
        assert!(MatRef::row_major(&data, usize::MAX, 2, "x").is_err());
    }

    #[test]
    fn aliasing_is_rejected_exactly() {
        let mut data = [0f32; 16];
        assert!(MatMut::new(&mut data, 2, 2, 3, 2, "c").is_ok(), "offsets 0, 2, 3, 5 are distinct");
        assert!(MatMut::new(&mut data, 3, 3, 2, 3, "c").is_ok(), "offsets 0, 2, 3, 4, 5, 6, 7, 8, 10");
        assert!(MatMut::new(&mut data, 4, 3, 2, 3, "c").is_err(), "(3, 0) and (0, 2) share offset 6");
        assert!(MatMut::new(&mut data, 3, 2, 0, 1, "c").is_err(), "zero row stride");
        assert!(MatMut::new(&mut data, 1, 4, 0, 1, "c").is_ok(), "one row: row stride unused");
        assert!(MatMut::new(&mut data, 2, 3, 2, 1, "c").is_err(), "(0, 2) and (1, 0) share offset 2");
        assert!(MatRef::new(&data, 2, 3, 2, 1, "a").is_ok(), "reads may alias");
    }

    #[test]
    fn transpose_swaps_dims_and_strides() {
        let data: Vec<i32> = (0..6).collect();
        let a = MatRef::row_major(&data, 2, 3, "a").unwrap();
        let t = a.t();
        assert_eq!((t.rows(), t.cols(), t.row_stride(), t.col_stride()), (3, 2, 1, 3));
        for i in 0..2 {
            for j in 0..3 {
                assert_eq!(a.get(i, j), t.get(j, i));
            }
        }
        assert_eq!(t.get(3, 0), None);
    }
}
