//! Typed handles on the balancer's maps, one per entry of the manifest
//! (`lb_common::for_each_map!`): `maps::BACKENDS.array_mut(&mut ebpf)` is an
//! `Array` of `BackendInfo`, and neither the name nor the value type is
//! written anywhere else.

use std::{marker::PhantomData, path::Path};

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, Map, MapData, PerCpuArray},
};

/// Map kinds, as type parameters of [`MapRef`].
pub mod kind {
    pub struct Array;
    pub struct PerCpuArray;
}

/// A map of the manifest: its name and, in the type, its kind and value.
pub struct MapRef<K, V> {
    pub name: &'static str,
    _kind: PhantomData<(K, V)>,
}

impl<K, V> MapRef<K, V> {
    const fn new(name: &'static str) -> Self {
        MapRef {
            name,
            _kind: PhantomData,
        }
    }

    fn map<'a>(&self, ebpf: &'a Ebpf) -> Result<&'a Map> {
        ebpf.map(self.name)
            .with_context(|| format!("map {} missing from the object", self.name))
    }

    fn map_mut<'a>(&self, ebpf: &'a mut Ebpf) -> Result<&'a mut Map> {
        ebpf.map_mut(self.name)
            .with_context(|| format!("map {} missing from the object", self.name))
    }

    /// The map pinned in `dir` (a running data plane's).
    pub fn pinned_data(&self, dir: &Path) -> Result<MapData> {
        let path = dir.join(self.name);
        MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))
    }
}

impl<V: aya::Pod> MapRef<kind::Array, V> {
    pub fn array<'a>(&self, ebpf: &'a Ebpf) -> Result<Array<&'a MapData, V>> {
        Array::try_from(self.map(ebpf)?)
            .with_context(|| format!("map {} is not an array of its manifest type", self.name))
    }

    pub fn array_mut<'a>(&self, ebpf: &'a mut Ebpf) -> Result<Array<&'a mut MapData, V>> {
        let name = self.name;
        Array::try_from(self.map_mut(ebpf)?)
            .with_context(|| format!("map {name} is not an array of its manifest type"))
    }

    /// The map itself (its fd, to map its values).
    pub fn data<'a>(&self, ebpf: &'a Ebpf) -> Result<&'a MapData> {
        match self.map(ebpf)? {
            Map::Array(data) => Ok(data),
            _ => anyhow::bail!("map {} is not an array", self.name),
        }
    }

    /// The map pinned in `dir`, typed.
    pub fn pinned(&self, dir: &Path) -> Result<Array<MapData, V>> {
        Array::try_from(Map::Array(self.pinned_data(dir)?)).with_context(|| {
            format!(
                "pinned map {} is not an array of its manifest type",
                self.name
            )
        })
    }
}

impl<V: aya::Pod> MapRef<kind::PerCpuArray, V> {
    pub fn per_cpu<'a>(&self, ebpf: &'a Ebpf) -> Result<PerCpuArray<&'a MapData, V>> {
        PerCpuArray::try_from(self.map(ebpf)?).with_context(|| {
            format!(
                "map {} is not a per-CPU array of its manifest type",
                self.name
            )
        })
    }

    pub fn per_cpu_mut<'a>(&self, ebpf: &'a mut Ebpf) -> Result<PerCpuArray<&'a mut MapData, V>> {
        let name = self.name;
        PerCpuArray::try_from(self.map_mut(ebpf)?)
            .with_context(|| format!("map {name} is not a per-CPU array of its manifest type"))
    }

    pub fn pinned(&self, dir: &Path) -> Result<PerCpuArray<MapData, V>> {
        PerCpuArray::try_from(Map::PerCpuArray(self.pinned_data(dir)?)).with_context(|| {
            format!(
                "pinned map {} is not a per-CPU array of its manifest type",
                self.name
            )
        })
    }
}

macro_rules! handles {
    ($($(#[$doc:meta])* $name:ident : $kind:ident < $value:ty >, $size:ident $(($n:expr))?, $flags:expr;)+) => {$(
        $(#[$doc])*
        pub const $name: MapRef<kind::$kind, $value> = MapRef::new(stringify!($name));
    )+};
}

lb_common::for_each_map!(handles);
