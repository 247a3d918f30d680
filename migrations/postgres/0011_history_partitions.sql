-- History partitioned by week, so that retention drops a week of pushes at once instead of
-- deleting its rows one by one (each delete rewrites a ~1.5 KB row's worth of WAL and every
-- index entry, and leaves the table and its indexes to vacuum).
--
-- `pushes` becomes a table partitioned by range of `id`. Ids are UUIDv7 text, whose first
-- 12 hex digits are the creation time in milliseconds, so one range of ids is one span of
-- time and a lookup by id (every write after admission) touches one partition. `id` is
-- compared bytewise (collation "C") so that the ranges follow the hex digits whatever the
-- database's collation. A partition is named after the Monday (UTC) its week starts:
-- pushes_w20261130 holds the pushes created from 2026-11-30 00:00 UTC to 2026-12-07.
--
-- The existing table is not copied: it becomes the first partition, `pushes_legacy`,
-- holding every id up to the end of the current week. New weeks are created four ahead, here
-- and by every retention purge (`umgw_rotate_history`), which also drops each week whose
-- newest push is older than the retention. There is no default partition: a push must fall
-- into a week, which it does unless the clock of the gateway that made its id is weeks off.

-- The smallest UUIDv7 text of millisecond `ms`: every id made at or after `ms` sorts at or
-- after it (bytewise), every id made before sorts before.
create function umgw_id_bound(ms bigint) returns text
language sql immutable parallel safe as $$
    select lpad(to_hex(ms >> 16), 8, '0') || '-' || lpad(to_hex(ms & 65535), 4, '0')
$$;

-- The start (epoch milliseconds) of the week (Monday 00:00 UTC) that contains `t`.
create function umgw_week_start(t timestamptz) returns bigint
language sql immutable parallel safe as $$
    -- 1970-01-05 was a Monday: 4 days after the epoch.
    select (floor((extract(epoch from t) * 1000 - 345600000) / 604800000))::bigint
           * 604800000 + 345600000
$$;

-- Creates the partitions of the weeks from the current one to `weeks_ahead` after it that
-- do not exist yet (a week inside `pushes_legacy` is skipped). Returns how many it made.
create function umgw_ensure_history_weeks(weeks_ahead integer) returns integer
language plpgsql as $$
declare
    week constant bigint := 604800000;
    first bigint := umgw_week_start(now());
    made integer := 0;
    start_ms bigint;
    part text;
begin
    for i in 0 .. greatest(weeks_ahead, 0) loop
        start_ms := first + i * week;
        part := 'pushes_w' || to_char(to_timestamp(start_ms / 1000) at time zone 'UTC', 'YYYYMMDD');
        continue when to_regclass(part) is not null;
        begin
            execute format('create table %I partition of pushes for values from (%L) to (%L)',
                           part, umgw_id_bound(start_ms), umgw_id_bound(start_ms + week));
            made := made + 1;
        exception when invalid_object_definition then
            -- The week overlaps an existing partition (pushes_legacy's last week).
            null;
        end;
    end loop;
    return made;
end
$$;

-- The retention of history: drops every partition whose newest possible push was created
-- before `cutoff` (the idempotency keys and callback events of its pushes first, which
-- the foreign keys would otherwise stop), then makes sure the coming weeks exist. Returns
-- the pushes dropped. The drop takes the table's exclusive lock for a moment; it waits
-- for it at most `lock_wait_ms` (a long-running query on pushes), then gives up until the
-- next purge rather than hold up the admissions queued behind it.
create function umgw_rotate_history(cutoff timestamptz, lock_wait_ms integer, weeks_ahead integer)
returns bigint
language plpgsql as $$
declare
    bound text;
    part record;
    n bigint;
    dropped bigint := 0;
begin
    if cutoff is not null then
        bound := umgw_id_bound((extract(epoch from cutoff) * 1000)::bigint);
        perform set_config('lock_timeout', lock_wait_ms::text, true);
        for part in
            select c.oid::regclass as rel,
                   substring(pg_get_expr(c.relpartbound, c.oid) from 'TO \(''([^'']*)''\)') as upper
              from pg_inherits i
              join pg_class c on c.oid = i.inhrelid
             where i.inhparent = 'pushes'::regclass
        loop
            continue when part.upper is null or part.upper collate "C" > bound collate "C";
            execute format('select count(*) from %s', part.rel) into n;
            execute format('delete from idempotency_keys k using %s p where k.push_id = p.id',
                           part.rel);
            execute format('delete from callback_events e using %s p where e.push_id = p.id',
                           part.rel);
            -- Detached first: the foreign keys hang on each partition.
            execute format('alter table pushes detach partition %s', part.rel);
            execute format('drop table %s', part.rel);
            dropped := dropped + n;
        end loop;
    end if;
    perform umgw_ensure_history_weeks(weeks_ahead);
    return dropped;
end
$$;

-- The existing table and what hangs on it: its indexes keep their definitions under new
-- names, the foreign keys and the callback trigger move to the new table.
alter table pushes rename to pushes_legacy;
alter table idempotency_keys drop constraint idempotency_keys_push_id_fkey;
alter table callback_events drop constraint callback_events_push_id_fkey;
drop trigger pushes_callback_event on pushes_legacy;
alter table pushes_legacy rename constraint pushes_pkey to pushes_legacy_pkey;
alter table pushes_legacy alter column id type text collate "C";

create table pushes (like pushes_legacy including all excluding indexes, primary key (id))
    partition by range (id);

do $$
declare
    ix record;
begin
    for ix in
        select c.relname as name, pg_get_indexdef(i.indexrelid) as def
          from pg_index i
          join pg_class c on c.oid = i.indexrelid
         where i.indrelid = 'pushes_legacy'::regclass and not i.indisprimary
    loop
        execute format('alter index %I rename to %I', ix.name, ix.name || '_legacy');
        -- The same index on the new table, under the old name; attaching pushes_legacy
        -- below adopts the existing index rather than building another.
        execute regexp_replace(ix.def, ' ON (\S+\.)?pushes_legacy ', ' ON pushes ');
    end loop;
    execute format('alter table pushes attach partition pushes_legacy for values from (minvalue) to (%L)',
                   umgw_id_bound(umgw_week_start(now()) + 604800000));
end
$$;

-- Deferred as before (0005): admission claims the key before it writes the row.
alter table idempotency_keys
    add constraint idempotency_keys_push_id_fkey
    foreign key (push_id) references pushes (id) on delete cascade
    deferrable initially deferred;
alter table callback_events
    add constraint callback_events_push_id_fkey
    foreign key (push_id) references pushes (id) on delete cascade;

create trigger pushes_callback_event
    after update of status on pushes
    for each row
    when (new.callback_url is not null
          and new.status is distinct from old.status
          and new.status in ('accepted', 'failed', 'unknown', 'done', 'send_failed',
                             'cancelled', 'expired', 'no_match', 'task_lost', 'withdrawn',
                             'partial'))
    execute function umgw_callback_event();

select umgw_ensure_history_weeks(4);
