-- Every Umeng call made for a push (upload or send: number, time, outcome, Umeng code,
-- latency), as a JSON array written with the push's outcome. Bounded: a synchronous push
-- makes at most four calls (an upload and a send, each retried once when nothing was sent,
-- and one fresh upload and send when Umeng forgot a reused file).
alter table pushes add column attempts jsonb not null default '[]'::jsonb;
