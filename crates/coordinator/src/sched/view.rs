//! `host` as CEL sees it, without building a map per host: a [`HostView`] borrows the class's
//! value for the class attributes and the host's [`AdVals`] for the strings and maps of its
//! ad (built once per ad), and carries its free figures by value. Making one costs nothing,
//! so a reservation or a release does not rebuild anything, and a lookup is a match on the
//! field name instead of a hash-map probe.

use super::expr::{val, HOST_CLASS_FIELDS, HOST_OWN_FIELDS};
use cel::common::traits::{Container, Indexer, Sizer};
use cel::common::types::{self, CelDouble, CelInt, CelString, Type};
use cel::common::value::{CowVal, Val};
use cel::ExecutionError;
use std::sync::Arc;
use vgrid_api::grid::HostAd;

/// The values of one ad that are not plain numbers.
#[derive(Debug)]
pub(super) struct AdVals {
    name: Box<dyn Val>,
    url: Box<dyn Val>,
    cgroups: Box<dyn Val>,
    image_cache: Box<dyn Val>,
}

impl AdVals {
    pub(super) fn of(ad: &HostAd) -> AdVals {
        AdVals {
            name: val::string(&ad.name),
            url: val::string(&ad.url),
            cgroups: val::string(&ad.cgroups),
            image_cache: val::double_map(&ad.image_cache),
        }
    }
}

/// `host`: a map of the fields in [`HOST_CLASS_FIELDS`] and [`HOST_OWN_FIELDS`].
#[derive(Debug, Clone, Copy)]
pub(super) struct HostView<'a> {
    /// The class's value (the class attributes).
    pub(super) class: &'a dyn Val,
    pub(super) own: &'a AdVals,
    pub(super) free_cpus: u64,
    pub(super) free_memory_mib: u64,
    /// Running plus reserved.
    pub(super) running_vms: u64,
    pub(super) load_avg: f64,
    pub(super) load_now: f64,
    pub(super) load_predicted: f64,
    pub(super) cpu_cap: f64,
    pub(super) free_cpu_share: f64,
}

impl Val for HostView<'_> {
    fn get_type(&self) -> &Type {
        &types::MAP_TYPE
    }

    fn cel_type() -> &'static Type {
        &types::MAP_TYPE
    }

    fn as_indexer<'b, 'v>(&'b self) -> Option<&'b (dyn Indexer + 'v)>
    where
        Self: 'v,
    {
        Some(self)
    }

    fn as_container(&self) -> Option<&dyn Container> {
        Some(self)
    }

    fn as_sizer(&self) -> Option<&dyn Sizer> {
        Some(self)
    }

    fn clone_as_boxed<'v>(&self) -> Box<dyn Val + 'v>
    where
        Self: 'v,
    {
        Box::new(*self)
    }
}

impl Indexer for HostView<'_> {
    fn get<'b, 'v>(&'b self, key: &dyn Val) -> Result<CowVal<'b, 'v>, ExecutionError>
    where
        Self: 'v,
    {
        let Some(field) = key.downcast_ref::<CelString>() else {
            return Err(ExecutionError::UnexpectedType { got: key.get_type().name().to_owned(), want: "map key".to_owned() });
        };
        let int = |i: u64| Ok(CowVal::owned(CelInt::from(i.min(i64::MAX as u64) as i64)));
        let double = |f: f64| Ok(CowVal::owned(CelDouble::from(f)));
        match field.inner() {
            "name" => Ok(CowVal::Borrowed(self.own.name.as_ref())),
            "url" => Ok(CowVal::Borrowed(self.own.url.as_ref())),
            "cgroups" => Ok(CowVal::Borrowed(self.own.cgroups.as_ref())),
            "image_cache" => Ok(CowVal::Borrowed(self.own.image_cache.as_ref())),
            "free_cpus" => int(self.free_cpus),
            "free_memory_mib" => int(self.free_memory_mib),
            "running_vms" => int(self.running_vms),
            "load_avg" => double(self.load_avg),
            "load_now" => double(self.load_now),
            "load_predicted" => double(self.load_predicted),
            "cpu_cap" => double(self.cpu_cap),
            "free_cpu_share" => double(self.free_cpu_share),
            f if HOST_CLASS_FIELDS.contains(&f) => match self.class.as_indexer() {
                Some(class) => class.get(key),
                None => Err(ExecutionError::NoSuchKey(Arc::new(f.to_string()))),
            },
            f => Err(ExecutionError::NoSuchKey(Arc::new(f.to_string()))),
        }
    }

    fn steal<'v>(self: Box<Self>, key: &dyn Val) -> Result<Box<dyn Val + 'v>, ExecutionError>
    where
        Self: 'v,
    {
        self.get(key).map(CowVal::into_owned)
    }
}

impl Container for HostView<'_> {
    fn contains(&self, value: &dyn Val) -> Result<bool, ExecutionError> {
        Ok(value
            .downcast_ref::<CelString>()
            .is_some_and(|s| HOST_CLASS_FIELDS.contains(&s.inner()) || HOST_OWN_FIELDS.contains(&s.inner())))
    }
}

impl Sizer for HostView<'_> {
    fn size(&self) -> CelInt {
        CelInt::from((HOST_CLASS_FIELDS.len() + HOST_OWN_FIELDS.len()) as i64)
    }
}
