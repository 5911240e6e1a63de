//! The byte layout of every type that crosses the kernel/userspace boundary,
//! as data: the map manifest's fingerprint ([`crate::manifest::fingerprint`])
//! is computed from it, so a changed field, offset or size names another pin
//! directory without anyone remembering to bump a version.

/// One field of a `#[repr(C)]` type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
}

/// A type whose bytes the kernel and userspace must read alike.
pub trait Layout {
    const NAME: &'static str;
    const SIZE: usize;
    const ALIGN: usize;
    /// In declaration order; empty for a plain integer.
    const FIELDS: &'static [Field];
}

/// The size of the field `f` projects to; `f` is never called.
#[doc(hidden)]
pub const fn field_size<T, F>(_f: fn(&T) -> &F) -> usize {
    core::mem::size_of::<F>()
}

/// Implements [`Layout`] for a struct from the list of its fields. A field
/// left out of the list is a compile error further down: the sizes must add
/// up (see the assertion).
#[macro_export]
macro_rules! layout {
    ($ty:ident { $($field:ident),+ $(,)? }) => {
        impl $crate::layout::Layout for $ty {
            const NAME: &'static str = stringify!($ty);
            const SIZE: usize = core::mem::size_of::<$ty>();
            const ALIGN: usize = core::mem::align_of::<$ty>();
            const FIELDS: &'static [$crate::layout::Field] = &[$(
                $crate::layout::Field {
                    name: stringify!($field),
                    offset: core::mem::offset_of!($ty, $field),
                    size: $crate::layout::field_size(|s: &$ty| &s.$field),
                },
            )+];
        }
        // Every byte belongs to a listed field: no implicit padding, which
        // would leave uninitialised bytes in hash keys and let a field be
        // forgotten here.
        const _: () = assert!(
            0 $(+ $crate::layout::field_size(|s: &$ty| &s.$field))+ == core::mem::size_of::<$ty>(),
            concat!(stringify!($ty), ": fields do not cover the type (implicit padding, or a field missing from layout!)")
        );
    };
}

macro_rules! plain {
    ($($ty:ident),+) => {$(
        impl Layout for $ty {
            const NAME: &'static str = stringify!($ty);
            const SIZE: usize = core::mem::size_of::<$ty>();
            const ALIGN: usize = core::mem::align_of::<$ty>();
            const FIELDS: &'static [Field] = &[];
        }
    )+};
}

plain!(u32, u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    struct Pair {
        a: u32,
        b: [u8; 4],
    }
    layout!(Pair { a, b });

    #[test]
    fn fields_carry_offsets_and_sizes() {
        assert_eq!(Pair::NAME, "Pair");
        assert_eq!(Pair::SIZE, 8);
        assert_eq!(
            Pair::FIELDS,
            &[
                Field {
                    name: "a",
                    offset: 0,
                    size: 4
                },
                Field {
                    name: "b",
                    offset: 4,
                    size: 4
                },
            ]
        );
        let _ = Pair { a: 0, b: [0; 4] };
    }
}
