//! Reading the announced directory: who holds which rank of which pair, whether a pair is matched,
//! and whether a batch is registered everywhere.

use std::collections::BTreeMap;

use tensorbus_protocol::control::{AnnounceValue, IdentifyValue};
use tensorbus_protocol::payload::{PairSide, TensorDesc};

/// The nodes on one side of a pair, by rank.
pub fn side<'a>(
    dir: &'a AnnounceValue,
    pair: &str,
    local_name: &str,
) -> Result<BTreeMap<usize, (&'a str, &'a IdentifyValue, &'a PairSide)>, String> {
    let mut out = BTreeMap::new();
    for (id, ident) in &dir.nodes {
        if let Some(ps) = ident.pairs.get(pair) {
            if ps.local_name == local_name {
                if let Some((other, _, _)) = out.insert(ps.rank, (id.as_str(), ident, ps)) {
                    return Err(format!(
                        "pair {pair}: nodes {other} and {id} both claim rank {} of {local_name}",
                        ps.rank
                    ));
                }
            }
        }
    }
    Ok(out)
}

/// `Ok(true)` when every rank of both sides of `pair` has registered it with consistent layouts.
pub fn pair_matched(dir: &AnnounceValue, pair: &str, me: &PairSide) -> Result<bool, String> {
    let mine = side(dir, pair, &me.local_name)?;
    let theirs = side(dir, pair, &me.remote_name)?;
    for (name, s) in [(&me.local_name, &mine), (&me.remote_name, &theirs)] {
        if let Some((_, _, first)) = s.values().next() {
            for (id, _, ps) in s.values() {
                if ps.mesh != first.mesh || ps.placements != first.placements || ps.world_size != first.world_size {
                    return Err(format!(
                        "pair {pair}: ranks of {name} disagree on the layout ({id} has mesh {:?} {:?}, another has {:?} {:?})",
                        ps.mesh, ps.placements, first.mesh, first.placements
                    ));
                }
                if ps.rank >= ps.world_size {
                    return Err(format!(
                        "pair {pair}: {id} claims rank {} of a {}-rank {name}",
                        ps.rank, ps.world_size
                    ));
                }
            }
        }
    }
    let Some((_, _, their)) = theirs.values().next() else { return Ok(false) };
    if their.remote_name != me.local_name {
        return Err(format!(
            "pair {pair}: {} pairs with {:?}, not with {:?}",
            me.remote_name, their.remote_name, me.local_name
        ));
    }
    Ok(mine.len() == me.world_size && theirs.len() == their.world_size)
}

/// The tensors `node` registered for `batch` on `pair`, in registration order.
pub fn tensors_on<'a>(ident: &'a IdentifyValue, batch: &str, pair: &str) -> Option<Vec<&'a TensorDesc>> {
    let reg = ident.batches.get(batch)?;
    Some(reg.pairs.iter().zip(&reg.tensors).filter(|(p, _)| *p == pair).map(|(_, t)| t).collect())
}

/// The global description of every tensor of `batch` on `pair`, from the local shapes all ranks of
/// one side (`side`, in `layout`) registered. Tensors are numbered within the pair.
pub fn pair_metas(
    side: &BTreeMap<usize, (&str, &IdentifyValue, &PairSide)>,
    layout: &tensorbus_planner::Layout,
    world_size: usize,
    batch: &str,
    pair: &str,
) -> Result<Vec<tensorbus_planner::BatchTensor>, String> {
    let per_rank: Vec<Vec<&TensorDesc>> = (0..world_size)
        .map(|r| side.get(&r).and_then(|(_, i, _)| tensors_on(i, batch, pair)).unwrap_or_default())
        .collect();
    let Some(first) = per_rank.first() else { return Ok(Vec::new()) };
    let mut metas = Vec::with_capacity(first.len());
    for (k, t) in first.iter().enumerate() {
        let locals: Vec<Vec<u64>> =
            per_rank.iter().map(|ts| ts.get(k).map(|d| d.shape.clone()).unwrap_or_default()).collect();
        let name = t.name.clone().unwrap_or_else(|| format!("{pair}[{k}]"));
        let global = layout.global_shape_from_locals(&name, &locals).map_err(|e| e.to_string())?;
        let dtype = t.dtype().map_err(|e| e.to_string())?;
        metas.push(tensorbus_planner::BatchTensor {
            pair: 0,
            meta: tensorbus_planner::TensorMeta::new(name, global, dtype),
        });
    }
    Ok(metas)
}
